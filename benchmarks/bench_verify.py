"""Spot-check verification on real `hearth node` processes (issue 19): false accusations, lies
caught, output against an honest run, and the throughput it costs.

Four nodes on 127.0.0.1 serve the model twice over (blocks [0, n/2) and [n/2, n), two nodes each);
the client runs in this process with fp16 activations (the wire codec on fast links), verify rate
--rate (default 0.1).

1. Honest swarms: --runs seeded runs of --tokens tokens, half on nodes of 1 torch thread, half on
   nodes of 2, 1 and 2 threads; each run starts 1 to 3 generations at once from one client (so
   every node's decode batches mix route and checker sessions of different generations). Counts
   any disagreement or ban (a false accusation) and the largest distance between a hop's answer
   and its checker's. The first generation of each run is the reference for phases 2 and 3.
2. A liar: the same swarm with one node started with --chaos corrupt:0.01 (a fresh client per
   run, since bans are a client's own): is it caught and banned, and are the tokens the honest
   reference's? In even runs the client routes through the liar until it is banned (so the lie
   reaches the route and is undone by a rollback); in odd runs the planner chooses (the liar is
   usually a checker then).
3. A sometimes-liar: --chaos corrupt-sometimes:0.01:0.2, the same questions.
0. Noise (in this process, no nodes; --phases noise): what the tolerance has to absorb. Per
   quantization, seeded prompts and --tokens decode steps through each span: the route hop's
   outputs step by step against a checker's (chunk-exact catch-ups at checks drawn at --rate, on
   another thread count; and decode steps batched with 3 other sessions) and against a one-pass
   catch-up (a proxy for another machine's float kernels: different reduction orders), through
   each wire codec; and what corrupt:0.01 and corrupt:0.003 noise measures.
4. Throughput: on the honest swarm (every span has a spare node; the route avoids the spares, which
   are the checkers), decode tokens/s with checks at --rate against none, alternating, --rounds
   each, --tokens per generation; the time of checks is in the figure (the client counts it with
   the step it follows), and the CPU the nodes and this process used per token beside it. On a
   machine of few cores the spares' recomputation competes with the route; --nice-spares runs them
   at nice 19, as spare nodes of machines of their own would not compete.

    python benchmarks/bench_verify.py [--model node/demo_model] [--quant int8] [--runs 100] [--tokens 64] [--rate 0.1]
        [--phases honest,corrupt,sometimes,throughput] [--reference FILE] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import write_section  # noqa: E402
from mesh.client import Client, ClientOptions, GenerationReport  # noqa: E402
from mesh.join import connect  # noqa: E402
from mesh.routing import NoRouteError  # noqa: E402
from node.swarm import LocalSwarm  # noqa: E402
from protocol import Codec  # noqa: E402
from shard.model_dir import open_model_dir  # noqa: E402
from shard.sampling import SamplingParams  # noqa: E402

DEMO_MODEL = Path(__file__).resolve().parents[1] / "node" / "demo_model"
PHASES = ("honest", "corrupt", "sometimes", "throughput")  # and "noise", only when asked


def prompt_of(seed: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(rng.randint(4, 40))]


class LiarFirst(Client):
    """A client that routes through `liar` until it is banned (planning leaves out `twin`, the
    honest node with the same blocks), so that the lie reaches the route and has to be undone."""

    liar, twin = "", ""

    async def plan(self, start: int = 0, end: int | None = None, *, banned: frozenset[str] = frozenset(),
                   need_tokens: int = 0):
        route = await super().plan(start, end, banned=banned, need_tokens=need_tokens)  # every peer probed, as usual
        if self.liar in banned or self.twin not in route.peers:
            return route
        return await super().plan(start, end, banned=banned | {self.twin}, need_tokens=need_tokens)


class RouteFirst(Client):
    """A client whose route avoids `spares` while it can (they are the checkers then)."""

    spares: frozenset[str] = frozenset()

    async def plan(self, start: int = 0, end: int | None = None, *, banned: frozenset[str] = frozenset(),
                   need_tokens: int = 0):
        route = await super().plan(start, end, banned=banned, need_tokens=need_tokens)  # every peer probed, as usual
        if not self.spares & set(route.peers):
            return route
        try:
            return await super().plan(start, end, banned=banned | self.spares, need_tokens=need_tokens)
        except NoRouteError:
            return route


def fresh_client(client: Client, model: Path, rate: float, seed: int, cls: type[Client] = Client) -> Client:
    """A client of its own (bans, rng) over `client`'s host: what a new `hearth generate` would be."""
    options = ClientOptions(codec=Codec.FP16, verify_rate=rate, seed=seed)
    return cls(client.transport, client.discovery, model, options=options, head=client.head,
               tokenizer=client.tokenizer)


async def generations(client: Client, prompts: list[list[int]], tokens: int) -> list[GenerationReport]:
    reports: list[GenerationReport] = [GenerationReport([]) for _ in prompts]

    async def one(index: int) -> None:
        async for _ in client.generate(prompt_ids=prompts[index], params=SamplingParams(max_new_tokens=tokens),
                                       report=reports[index]):
            pass

    async with trio.open_nursery() as nursery:
        for index in range(len(prompts)):
            nursery.start_soon(one, index)
    return reports


async def swarm_of(stack, model: Path, quant: str, work_dir: str, threads: list[int], chaos: str | None = None):
    """Four nodes, two per span; node 3 with `chaos` if given. Returns (swarm, the chaos node or None,
    node 1: the other node of node 3's blocks)."""
    swarm = await stack.enter_async_context(LocalSwarm(model, quant=quant, work_dir=work_dir))
    n_blocks = open_model_dir(model, verify=False).config.num_layers
    spans = [(0, n_blocks // 2), (n_blocks // 2, n_blocks)] * 2
    nodes = []
    for index, ((start, end), count) in enumerate(zip(spans, threads)):
        extra = ["--threads", str(count), "--idle-timeout", "120"]
        if chaos and index == 3:
            extra += ["--chaos", chaos]
        nodes.append(await swarm.add(start, end, extra_args=extra))
        if index == 0:
            await nodes[0].wait_ready(300)
    for node in nodes:
        await node.wait_ready(300)
    return swarm, (nodes[3] if chaos else None), nodes[1]


async def honest_runs(args, model: Path, vocab: int, tmp: str) -> tuple[dict, dict[int, list[int]]]:
    """Phase 1: (figures, seed -> reference tokens)."""
    from contextlib import AsyncExitStack

    accused, runs, max_distance, checks, reference = 0, 0, 0.0, 0, {}
    for threads, seeds in (([1, 1, 1, 1], range(0, args.runs // 2)), ([1, 2, 2, 1], range(args.runs // 2, args.runs))):
        async with AsyncExitStack() as stack:
            swarm, _, _ = await swarm_of(stack, model, args.quant, tmp, threads)
            async with connect(bootstrap=swarm.bootstrap, model=model, options=ClientOptions(codec=Codec.FP16)) as base:
                for seed in seeds:
                    together = 1 + seed % 3
                    client = fresh_client(base, model, args.rate, seed)
                    prompts = [prompt_of(seed * 7 + i, vocab) for i in range(together)]
                    reports = await generations(client, prompts, args.tokens)
                    reference[seed] = reports[0].token_ids
                    for report in reports:
                        checked = report.verification
                        runs += 1
                        accused += bool(checked.disagreements or checked.banned)
                        max_distance = max(max_distance, checked.max_distance)
                        checks += checked.checks
                    print(f"honest seed {seed} threads {threads} x{together}: "
                          + "; ".join(str(report.verification.to_json()) for report in reports), flush=True)
    return {"generations": runs, "accused": accused, "max_distance": max_distance, "checks": checks}, reference


async def liar_runs(args, model: Path, vocab: int, tmp: str, chaos: str, reference: dict[int, list[int]]) -> dict:
    from contextlib import AsyncExitStack

    caught = same = caught_and_same = on_route = 0
    redone = []
    async with AsyncExitStack() as stack:
        swarm, liar, twin = await swarm_of(stack, model, args.quant, tmp, [1, 1, 1, 1], chaos=chaos)
        LiarFirst.liar, LiarFirst.twin = liar.peer_id, twin.peer_id
        async with connect(bootstrap=swarm.bootstrap, model=model, options=ClientOptions(codec=Codec.FP16)) as base:
            for seed in sorted(reference):  # even seeds: the liar on the route; odd: wherever the planner puts it
                client = fresh_client(base, model, args.rate, seed, LiarFirst if seed % 2 == 0 else Client)
                [report] = await generations(client, [prompt_of(seed * 7, vocab)], args.tokens)
                checked = report.verification
                is_caught = checked.banned == [liar.peer_id]
                is_same = report.token_ids == reference[seed]
                caught += is_caught
                same += is_same
                caught_and_same += is_caught and is_same
                on_route += checked.rollbacks > 0
                redone.append(checked.tokens_redone)
                print(f"{chaos} seed {seed}: caught {is_caught}, same tokens {is_same}, {checked.to_json()}", flush=True)
    return {"runs": len(reference), "caught": caught, "same": same, "caught_and_same": caught_and_same,
            "rolled_back": on_route, "tokens_redone": sum(redone)}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes `pids` have used so far (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / ticks


async def throughput(args, model: Path, vocab: int, tmp: str) -> dict:
    """Phase 4: per rate, each generation's tokens/s; and the nodes' and this process's CPU seconds."""
    from contextlib import AsyncExitStack

    rates: dict = {0.0: [], args.rate: []}
    cpu: dict = {0.0: [0.0, 0.0, 0], args.rate: [0.0, 0.0, 0]}  # rate -> [nodes' CPU s, client's CPU s, tokens]
    async with AsyncExitStack() as stack:
        swarm, _, _ = await swarm_of(stack, model, args.quant, tmp, [1, 1, 1, 1])
        pids = [node.pid for node in swarm.nodes]
        RouteFirst.spares = frozenset(node.peer_id for node in swarm.nodes[2:])
        if args.nice_spares:  # spare nodes get only the CPU the route leaves: as on machines of their own
            for node in swarm.nodes[2:]:
                os.setpriority(os.PRIO_PROCESS, node.pid, 19)
        async with connect(bootstrap=swarm.bootstrap, model=model, options=ClientOptions(codec=Codec.FP16)) as base:
            await generations(fresh_client(base, model, 0.0, 0), [prompt_of(0, vocab)], 8)  # warm-up
            for round_ in range(args.rounds):
                for rate in (0.0, args.rate) if round_ % 2 == 0 else (args.rate, 0.0):
                    client = fresh_client(base, model, rate, round_, RouteFirst)
                    nodes_before, client_before = cpu_seconds(pids), time.process_time()
                    [report] = await generations(client, [prompt_of(1000 + round_, vocab)], args.tokens)
                    cpu[rate][0] += cpu_seconds(pids) - nodes_before
                    cpu[rate][1] += time.process_time() - client_before
                    cpu[rate][2] += len(report.token_ids)
                    rates[rate].append(report.tokens_per_s)
                    print(f"throughput round {round_} rate {rate}: {report.tokens_per_s:.1f} tok/s "
                          f"({report.verification.checks} checks)", flush=True)
    rates["cpu"] = {rate: (nodes / tokens * 1e3, client / tokens * 1e3) for rate, (nodes, client, tokens) in cpu.items()}
    return rates


def noise(args) -> str:
    """Phase 0: the largest honest distance by path and codec, and the smallest corrupted one."""
    from mesh.verify import row_distance
    from protocol import decode_tensor, encode_tensor
    from shard.head import load_head
    from shard.interfaces import BatchStep
    from shard.span import load_span

    opened = open_model_dir(args.model)
    head, n_blocks = load_head(opened), opened.config.num_layers
    codecs = (Codec.FP32, Codec.FP16, Codec.BF16, Codec.INT8_BLOCK64)

    def run(span, hidden, groups, *, exact=True, threads=1, others=0):
        torch.set_num_threads(threads)
        rng = np.random.default_rng(1)
        cache, outputs, offset = span.new_cache(1, hidden.shape[1]), [], 0
        company = [span.new_cache(1, hidden.shape[1] + 8) for _ in range(others)]
        for group in groups:
            part = hidden[:, offset:offset + sum(group)]
            offset += sum(group)
            if others and len(group) == 1 and group[0] == 1 and cache.length:
                steps = [BatchStep(part, cache, span.start, span.end)] + [
                    BatchStep(rng.standard_normal(part.shape).astype(np.float32), c, span.start, span.end)
                    for c in company]
                outputs.append(span.run_batch(steps)[0])
            else:
                outputs.append(span.run(part, cache, group if exact else ()))
        torch.set_num_threads(1)
        return np.concatenate(outputs, axis=1)

    worst: dict[tuple[str, str], float] = {}
    for quant in ("none", "int8", "int4"):
        spans = [load_span(opened, 0, n_blocks // 2, quant=quant), load_span(opened, n_blocks // 2, n_blocks, quant=quant)]
        for seed in range(args.noise_seeds):
            rng = random.Random(seed)
            prompt = prompt_of(seed, opened.config.vocab_size)
            steps = [len(prompt)] + [1] * args.tokens
            checks, current = [], []
            for index, step in enumerate(steps):
                current.append(step)
                if index == 0 or rng.random() < args.rate or index == len(steps) - 1:
                    checks.append(tuple(current))
                    current = []
            hidden = head.embed_tokens(prompt + [rng.randrange(3, opened.config.vocab_size) for _ in range(args.tokens)])
            for span in spans:
                route = run(span, hidden, [(step,) for step in steps])
                exact = max(row_distance(run(span, hidden, checks, threads=2), route).max(),
                            row_distance(run(span, hidden, [(step,) for step in steps], others=3), route).max()
                            if span.batch_rows > 1 else 0.0)
                worst[(quant, "exact")] = max(worst.get((quant, "exact"), 0.0), float(exact))
                proxy = run(span, hidden, checks, exact=False, threads=2)
                rms = np.sqrt((route.astype(np.float64) ** 2).mean(-1, keepdims=True))
                lies = {rel: route + (np.random.default_rng(seed).standard_normal(route.shape) * rel * rms).astype(np.float32)
                        for rel in (0.01, 0.003)}
                for codec in codecs:
                    def wire(array, codec=codec):
                        return decode_tensor(encode_tensor(array, codec))

                    key = (quant, codec.name)
                    worst[key] = max(worst.get(key, 0.0), float(row_distance(wire(proxy), wire(route)).max()))
                    for rel, lie in lies.items():
                        low = (quant, f"{codec.name} corrupt:{rel:g}")
                        worst[low] = min(worst.get(low, 1.0), float(row_distance(wire(lie), wire(route)).min()))
                hidden = route
            print(f"noise {quant} seed {seed} done", flush=True)
    names = [codec.name.lower() for codec in codecs]
    lines = [f"noise: {args.noise_seeds} seeded prompts x {args.tokens} decode steps per quantization, spans "
             f"[0, {n_blocks // 2}) and [{n_blocks // 2}, {n_blocks}); relative RMS per token row",
             "quant | same machine (threads 1 vs 2, batched with 3, chunk-exact catch-ups) | one-pass proxy, wire "
             + " / ".join(names) + " | corrupt:0.01 (smallest) | corrupt:0.003 (smallest)"]
    for quant in ("none", "int8", "int4"):
        proxy = " / ".join(f"{worst[(quant, codec.name)]:.2g}" for codec in codecs)
        lie = " / ".join(f"{worst[(quant, f'{codec.name} corrupt:0.01')]:.2g}" for codec in codecs)
        small = " / ".join(f"{worst[(quant, f'{codec.name} corrupt:0.003')]:.2g}" for codec in codecs)
        lines.append(f"{quant} | {worst[(quant, 'exact')]:.2g} | {proxy} | {lie} | {small}")
    return "\n".join(lines)


async def measure(args) -> dict:
    """The phases asked for; the honest phase's reference tokens go to (or, without it, come from)
    --reference, so the phases can run in processes of their own."""
    model = args.model
    vocab = open_model_dir(model, verify=False).config.vocab_size
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        if "honest" in args.phases:
            result["honest"], reference = await honest_runs(args, model, vocab, tmp)
            if args.reference:
                args.reference.write_text(json.dumps(reference))
        elif args.reference:
            reference = {int(seed): tokens for seed, tokens in json.loads(args.reference.read_text()).items()}
        if "corrupt" in args.phases:
            result["corrupt"] = await liar_runs(args, model, vocab, tmp, "corrupt:0.01", reference)
        if "sometimes" in args.phases:
            sometimes_ref = dict(list(reference.items())[: args.sometimes_runs])
            result["sometimes"] = await liar_runs(args, model, vocab, tmp, "corrupt-sometimes:0.01:0.2", sometimes_ref)
        if "throughput" in args.phases:
            result["rates"] = await throughput(args, model, vocab, tmp)
        result["minutes"] = (time.perf_counter() - started) / 60
    return result


def summary(args, result: dict) -> str:
    lines = [f"model {args.model.name}, quant {args.quant}, 2 spans x 2 nodes on 127.0.0.1, fp16 activations, "
             f"verify rate {args.rate}, {args.tokens} tokens per generation ({result['minutes']:.0f} min)"]
    if honest := result.get("honest"):
        lines.append(f"honest: {honest['generations']} generations in {args.runs} seeded runs (1-3 at once; nodes "
                     f"of 1 or 2 threads): {honest['accused']} accused, {honest['checks']} hop checks, largest "
                     f"distance {honest['max_distance']:.3g}")
    for name, label in (("corrupt", "corrupt:0.01"), ("sometimes", "corrupt-sometimes:0.01:0.2")):
        if lying := result.get(name):
            lines.append(f"{label}: caught {lying['caught']}/{lying['runs']}, tokens = honest {lying['same']}/"
                         f"{lying['runs']} (both {lying['caught_and_same']}); liar on the route (rolled back) in "
                         f"{lying['rolled_back']}, {lying['tokens_redone']} tokens redone in all")
    if rates := result.get("rates"):
        base, checked = statistics.median(rates[0.0]), statistics.median(rates[args.rate])
        lines.append(f"throughput: rate 0 {base:.1f} tok/s, rate {args.rate} {checked:.1f} tok/s (medians of "
                     f"{args.rounds}): {checked / base:.2f}x (target >= 0.85x)")
        (nodes_off, client_off), (nodes_on, client_on) = rates["cpu"][0.0], rates["cpu"][args.rate]
        lines.append(f"CPU per token: nodes {nodes_off:.1f} ms, client {client_off:.1f} ms at rate 0; nodes "
                     f"{nodes_on:.1f} ms, client {client_on:.1f} ms at rate {args.rate} ({os.cpu_count()} cores)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--quant", default="int8", choices=("auto", "none", "int8", "int4"))
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--sometimes-runs", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=6, help="throughput generations per rate")
    parser.add_argument("--nice-spares", action="store_true",
                        help="throughput: run the spare nodes (the checkers) at nice 19, so that on this machine "
                             "they use only the CPU the route leaves, as spare nodes on machines of their own would")
    parser.add_argument("--noise-seeds", type=int, default=10, help="prompts per quantization in the noise phase")
    parser.add_argument("--phases", type=lambda text: set(text.split(",")), default=set(PHASES),
                        help=f"comma-separated, of {','.join(PHASES)} (default: all)")
    parser.add_argument("--reference", type=Path, help="JSON file of the honest tokens per seed: written by the "
                                                       "honest phase, read by the liar phases without it")
    parser.add_argument("--record", action="store_true", help="write the figures to benchmarks/RESULTS.md")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(1)
    if args.phases == {"noise"}:
        text = noise(args)
        print("\n" + text)
        return
    result = trio.run(measure, args)
    text = summary(args, result)
    print("\n" + text)
    if args.record:
        command = " ".join(["python benchmarks/bench_verify.py", *sys.argv[1:]]).replace(" --record", "")
        write_section(f"## Spot-check verification (bench_verify.py)\n\nCommand: `{command}`\n\n```\n{text}\n```\n")


if __name__ == "__main__":
    main()
