"""Failover cost on loopback: recovery time after a SIGKILL, and throughput under random failures.

Real `hearth node` processes on 127.0.0.1 (every span served twice) and a client in this process,
on a random Llama (default hidden 512, 8 layers: the model of the Petals measurements in
docs/measured.md), fp32 activations so every run's tokens can be compared with the failure-free run.

1. Recovery: generate with a history of --history tokens, SIGKILL the node of the last hop, and
   time from the kill to the next token (detection + replanning + replay + the step itself).
2. Throughput: decode tokens/s when, at every step, each hop's node is SIGKILLed with probability
   p (seeded), for p = 0, 1e-3, 1e-2, with --replicas nodes per span (killed nodes stay dead
   unless --respawn). Printed as ratios to p = 0 measured in the same run.

    python benchmarks/bench_failover.py [--tokens 200] [--history 64] [--hidden 512] [--layers 8] [--replicas 4]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_local import save_model  # noqa: E402
from mesh.client import ClientOptions, GenerationReport  # noqa: E402
from mesh.join import connect  # noqa: E402
from mesh.session import HopSession  # noqa: E402
from node.swarm import LocalSwarm  # noqa: E402
from protocol import Codec  # noqa: E402
from shard.sampling import SamplingParams  # noqa: E402

PROMPT = list(range(10, 26))


class Killer:
    """Wraps HopSession.step: before a step, SIGKILLs that hop's node with probability p; respawned
    nodes start in `respawns`, a nursery of the generation's."""

    def __init__(self, swarm: LocalSwarm, p: float, seed: int, respawn: bool):
        self.swarm, self.p, self.rng, self.respawn = swarm, p, random.Random(seed), respawn
        self.kills: list[float] = []
        self.kill_at_step: int | None = None
        self.respawns: trio.Nursery | None = None
        self._original = HopSession.step

    async def step(self, hop: HopSession, hidden, position, **kwargs):
        if not kwargs.get("replay"):
            if hop.step_number == self.kill_at_step and hop.end == self.swarm_blocks():
                self.kill_at_step = None  # once
                self.kill(hop)
            elif self.p and self.rng.random() < self.p:
                self.kill(hop)
        return await self._original(hop, hidden, position, **kwargs)

    def swarm_blocks(self) -> int:
        return max(int(node.args[3].split(":")[1]) for node in self.swarm.nodes)

    def kill(self, hop: HopSession) -> None:
        victim = next((n for n in self.swarm.nodes if n.peer_id == hop.peer_id and n.running), None)
        if victim is None:
            return
        victim.signal(signal.SIGKILL)
        self.kills.append(time.perf_counter())
        if self.respawn:  # churn: someone else brings those blocks back a few seconds later
            start, end = (int(x) for x in victim.args[3].split(":"))
            self.respawns.start_soon(self._respawn, start, end)

    async def _respawn(self, start: int, end: int) -> None:
        node = await self.swarm.add(start, end)  # the swarm stops it with the others
        os.setpriority(os.PRIO_PROCESS, node.pid, 19)  # a newcomer's start-up must not slow the others


async def generate(swarm: LocalSwarm, model_dir: Path, tokens: int, killer: Killer) -> tuple[GenerationReport, list]:
    options = ClientOptions(codec=Codec.FP32, ban_s=30.0)
    stamps: list[float] = []
    HopSession.step = lambda hop, *a, **k: killer.step(hop, *a, **k)
    try:
        async with trio.open_nursery() as respawns:
            killer.respawns = respawns
            async with connect(bootstrap=swarm.bootstrap, model=model_dir, options=options) as client:
                report = GenerationReport([])
                async for _ in client.generate(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=tokens),
                                               report=report):
                    stamps.append(time.perf_counter())
    finally:
        HopSession.step = killer._original
    return report, stamps


async def recovery_time(model_dir: Path, spans, history: int, work_dir: str) -> tuple[float, GenerationReport]:
    async with LocalSwarm(model_dir, work_dir=work_dir, extra_args=["--threads", "1"]) as swarm:
        await swarm.start(spans + spans, timeout=300)
        killer = Killer(swarm, 0.0, 0, respawn=False)
        killer.kill_at_step = history - len(PROMPT) + 1  # the hop has seen `history` tokens
        report, stamps = await generate(swarm, model_dir, history + 4, killer)
    [killed] = killer.kills
    next_token = min(t for t in stamps if t > killed)
    return next_token - killed, report


async def throughput(model_dir: Path, spans, tokens: int, p: float, seed: int, work_dir: str,
                     replicas: int, respawn: bool) -> tuple[float, GenerationReport]:
    async with LocalSwarm(model_dir, work_dir=work_dir, extra_args=["--threads", "1"]) as swarm:
        await swarm.start(spans * replicas, timeout=300)
        killer = Killer(swarm, p, seed, respawn=respawn)
        report, _ = await generate(swarm, model_dir, tokens, killer)
    return (len(report.token_ids) - 1) / report.decode_s, report


async def measure(args: argparse.Namespace) -> tuple[float, dict[float, list[float]]]:
    """The recovery time, and per failure probability the decode tokens/s of each seed's run."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        save_model(model_dir, args)
        spans = [(0, args.layers // 3), (args.layers // 3, 2 * args.layers // 3), (2 * args.layers // 3, args.layers)]
        seconds, recovered = await recovery_time(model_dir, spans, args.history, tmp)
        print(f"recovery after SIGKILL with a {args.history}-token history: {seconds * 1e3:.0f} ms to the next token "
              f"(replay took {recovered.recoveries[0].seconds * 1e3:.0f} ms)", flush=True)
        rates: dict[float, list[float]] = {}
        reference = None
        for p in (0.0, 1e-3, 1e-2):
            for seed in range(args.seeds):
                rate, report = await throughput(model_dir, spans, args.tokens, p, seed, tmp, args.replicas, args.respawn)
                reference = reference or report.token_ids
                same = "same tokens" if report.token_ids == reference else "DIFFERENT TOKENS"
                took = ", ".join(f"{r.seconds:.2f}" for r in report.recoveries)
                print(f"p={p:g} seed {seed}: {rate:.1f} tok/s, {len(report.recoveries)} recoveries ({took} s), {same}",
                      flush=True)
                rates.setdefault(p, []).append(rate)
    return seconds, rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--history", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3, help="runs per failure probability (median reported)")
    parser.add_argument("--replicas", type=int, default=4, help="nodes per span in the throughput runs")
    parser.add_argument("--respawn", action="store_true",
                        help="restart killed nodes here (on a 2-core machine their start-up competes with the run)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    seconds, rates = trio.run(measure, args)
    base = statistics.median(rates[0.0])
    print(f"\nrandom Llama h{args.hidden} L{args.layers}, 3 spans x {args.replicas} replicas "
          f"({'killed nodes restarted' if args.respawn else 'no restarts'}), {args.tokens} tokens, fp32 activations")
    print(f"recovery (SIGKILL -> next token, {args.history}-token history): {seconds * 1e3:.0f} ms")
    for p, samples in rates.items():
        print(f"p={p:<6g} {statistics.median(samples):7.1f} tok/s  {statistics.median(samples) / base:5.2f}x failure-free")


if __name__ == "__main__":
    main()
