"""Batching on nodes: aggregate decode tokens/s of 8 concurrent clients vs 1, on a 2-node swarm.

Builds the random ~1B Llama of bench_local.py (or takes --model DIR), starts two `hearth node`
processes on 127.0.0.1 serving half each, and measures, in alternating rounds so that the shared
machine's drift hits both alike: one client generating alone, then --clients clients generating
at once (concurrent generations of one client library in this process, each its own sessions, as
an API server's users are). A node runs the decode steps its sessions send while it is busy as one
batched forward pass (node.sessions, shard.batch), so the weights are read once per batch instead
of once per session; the client likewise runs its generations' int8 LM head rows in one pass.

Aggregate decode tokens/s = tokens decoded after each client's first token, summed over clients,
divided by the time from the earliest first token to the latest last one. Target: >= 3x of one client.

    python benchmarks/bench_batching.py [--clients 8] [--tokens 64] [--rounds 2] [--quant int8] [--layers 16] [--hidden 2048]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_local import model_or_build  # noqa: E402
from mesh.client import Client, ClientOptions, GenerationReport  # noqa: E402
from mesh.join import connect  # noqa: E402
from node.swarm import LocalSwarm  # noqa: E402
from shard.sampling import SamplingParams  # noqa: E402

PROMPT_TOKENS = 16


def prompt_ids(seed: int) -> list[int]:
    return torch.randint(3, 32000, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(seed)).tolist()


async def generation(client: Client, seed: int, tokens: int) -> tuple[list[float], list[int], list[tuple[float, float]]]:
    """Perf-counter times at which each token arrived, the tokens, and per hop the mean seconds per
    decode step of the node's compute and of the client's round trip."""
    report, times, after_prefill = GenerationReport([]), [], []
    async for _ in client.generate(prompt_ids=prompt_ids(seed), params=SamplingParams(max_new_tokens=tokens),
                                   report=report):
        times.append(time.perf_counter())
        if not after_prefill:
            after_prefill = [(hop.compute_s, hop.total_s) for hop in report.hops]
    steps = max(1, len(times) - 1)
    hops = [((hop.compute_s - c) / steps, (hop.total_s - t) / steps) for hop, (c, t) in zip(report.hops, after_prefill)]
    return times, report.token_ids, hops


async def concurrent(client: Client, clients: int, tokens: int) -> tuple[float, list[float], list[list[int]], list]:
    """Aggregate decode tokens/s of `clients` generations at once, each one's own decode tokens/s,
    the tokens, and client 0's per-hop (compute, round trip) seconds per step."""
    results: list = [None] * clients

    async def one(index: int) -> None:
        results[index] = await generation(client, index, tokens)

    async with trio.open_nursery() as nursery:
        for index in range(clients):
            nursery.start_soon(one, index)
    decoded = sum(len(times) - 1 for times, _, _ in results)
    window = max(times[-1] for times, _, _ in results) - min(times[0] for times, _, _ in results)
    each = [(len(times) - 1) / (times[-1] - times[0]) for times, _, _ in results]
    return decoded / window, each, [ids for _, ids, _ in results], results[0][2]


async def measure(bootstrap: str, model_dir: Path, clients: int, tokens: int, rounds: int) -> dict:
    # The clients' LM head in int8: eight users' heads share this process's cores with both nodes.
    async with connect(bootstrap=[bootstrap], model=model_dir, options=ClientOptions(head_quant="int8")) as client:
        await concurrent(client, clients, 4)  # warm-up: routes, round trips, both nodes' code paths
        alone, together, each, same = [], [], [], True
        for round_ in range(rounds):
            rate, _, solo_ids, solo_hops = await concurrent(client, 1, tokens)
            alone.append(rate)
            rate, rates, ids, hops = await concurrent(client, clients, tokens)
            together.append(rate)
            each += rates
            same &= ids[0] == solo_ids[0]
            print(f"round {round_ + 1}: 1 client {alone[-1]:.2f} tok/s, {clients} clients {together[-1]:.2f} tok/s "
                  f"({together[-1] / alone[-1]:.2f}x)", flush=True)
            for name, per_hop in (("alone", solo_hops), ("batched", hops)):
                print(f"  {name:>7}: per decode step, node compute / round trip: "
                      + ", ".join(f"hop {i} {c * 1e3:.1f} / {t * 1e3:.1f} ms" for i, (c, t) in enumerate(per_hop)))
    return {"alone": alone, "together": together, "each": each, "same_tokens": same}


async def run(args: argparse.Namespace) -> dict:
    """`measure` on a 2-node swarm of the model, stopped afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_or_build(args, tmp)
        async with LocalSwarm(model_dir, quant=args.quant, work_dir=tmp,
                              extra_args=["--threads", str(args.threads)]) as swarm:
            await swarm.start(swarm.spans(2), timeout=600)
            return await measure(swarm.bootstrap[0], model_dir, args.clients, args.tokens, args.rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model directory (default: build the random ~1B model)")
    parser.add_argument("--quant", default="int8", choices=("none", "int8", "int4"))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each node")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle node processes must not spin on the cores
    torch.set_num_threads(1)  # the clients' heads: one core, the nodes the rest
    result = trio.run(run, args)
    alone, together = statistics.median(result["alone"]), statistics.median(result["together"])
    print(f"\n2-node swarm, quant {args.quant}, {PROMPT_TOKENS}-token prompts, {args.rounds} rounds x {args.tokens} tokens, "
          f"{args.threads} torch thread(s) per node")
    print(f"1 client:   {alone:.2f} decode tok/s (median of rounds)")
    print(f"{args.clients} clients: {together:.2f} decode tok/s aggregate, "
          f"{statistics.median(result['each']):.2f} tok/s per client (median)")
    print(f"aggregate / one client: {together / alone:.2f}x (target >= 3x); "
          f"client 0's tokens identical alone and batched: {result['same_tokens']}")


if __name__ == "__main__":
    main()
