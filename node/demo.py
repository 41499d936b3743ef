"""`hearth demo`: a swarm of node processes on this machine generating text, with optional failover.

Starts N `hearth node` processes on 127.0.0.1, each serving a share of the model's blocks, joins
through one bootstrap address, and streams a completion. `--kill-one` adds a standby node for
the middle share and SIGKILLs the route's middle node mid-answer: the client replays its history
to the standby and the text continues, token for token the same.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import trio

from mesh.client import ClientOptions, GenerationReport
from mesh.join import connect
from node.run_local import add_threads_argument
from node.swarm import LocalSwarm
from shard.compute import use_threads
from shard.quant import QUANT_MODES
from shard.sampling import SamplingParams

DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"
DEFAULT_PROMPT = "def fibonacci(n):"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=DEMO_MODEL, metavar="DIR",
                        help="model directory (default: the bundled demo model)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--nodes", type=int, default=3, metavar="N")
    parser.add_argument("--quant", choices=QUANT_MODES, default="int8")
    parser.add_argument("--max-new-tokens", type=int, default=80, metavar="N")
    parser.add_argument("--repetition-penalty", type=float, default=1.2, metavar="R",
                        help="discourages the small demo model's loops (1 = off); output stays greedy")
    parser.add_argument("--kill-one", action="store_true", help="kill a node on the route mid-answer")
    add_threads_argument(parser, default=1, what=" per node")


def say(text: str) -> None:
    print(f"[hearth] {text}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if args.nodes < 1:
        raise ValueError(f"--nodes must be at least 1, got {args.nodes}")
    use_threads(args.threads)  # checks it; the nodes get it too
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle nodes must not spin on the cores
    _summary(trio.run(_demo, args))
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
    kill_at = args.max_new_tokens // 3 if args.kill_one else None
    report = GenerationReport([])
    options = ClientOptions(step_timeout_s=5.0)
    async with connect(bootstrap=swarm.bootstrap, model=args.model, options=options) as client:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty)
        route_shown = False
        sys.stdout.write(args.prompt)
        async for emitted in client.generate(args.prompt, params=params, report=report):
            if not route_shown:
                route_shown = True
                say("route: " + " -> ".join(f"{h.peer_id[-6:]}[{h.start}:{h.end}]" for h in report.hops))
            sys.stdout.write(emitted.text)
            sys.stdout.flush()
            if kill_at is not None and len(report.token_ids) == kill_at:
                _kill_middle_hop(swarm, report)
        sys.stdout.write("\n")
    return report


def _kill_middle_hop(swarm: LocalSwarm, report: GenerationReport) -> None:
    victim_id = report.hops[len(report.hops) // 2].peer_id
    victim = next(node for node in swarm.nodes if node.peer_id == victim_id)
    victim.signal(signal.SIGKILL)
    say(f"\n*** killed {victim.name} (pid {victim.pid}, blocks {victim.args[3]}) mid-answer ***")


def _summary(report: GenerationReport) -> None:
    say(f"{len(report.token_ids)} tokens, {report.tokens_per_s:.1f} tokens/s "
        f"(prefill {report.prefill_s * 1e3:.0f} ms, decode {report.decode_s:.2f} s)")
    for hop in report.hops:
        say(f"  hop {hop.peer_id[-6:]} blocks [{hop.start}, {hop.end}): compute {hop.compute_s * 1e3:.0f} ms, "
            f"round trips {hop.total_s * 1e3:.0f} ms")
    for recovery in report.recoveries:
        say(f"  recovered from {recovery.failed_peer[-6:]} [{recovery.start}, {recovery.end}) "
            f"({recovery.reason}): replayed {recovery.tokens_replayed} tokens onto "
            f"{', '.join(p[-6:] for p in recovery.replacements)} in {recovery.seconds * 1e3:.0f} ms")
