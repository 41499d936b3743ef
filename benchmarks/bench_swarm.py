"""Decode speed through a 3-node loopback swarm vs the same model in one process, in one run.

Builds the random ~1B Llama of bench_local.py (or takes --model DIR), then measures decode
tokens/s at batch 1 after a 128-token prompt: (1) one process running the whole model with the
same quantization; (2) three `hearth node` processes on 127.0.0.1, each serving a third, and a
client in this process (steps over the nodes' data channels, as by default). The two alternate for
--rounds rounds, so that the shared machine's drift hits both alike; the ratio is of the medians
per token (means beside them). Per hop it prints the node's own compute per decode step, the same
span run in this process, and the round trip; and a plain trio TCP round trip between two
processes with a message of one hop's size, so the swarm's per-hop overhead can be read against it:
hot, and as in the swarm: the echoing process busy for a hop's compute before each answer and idle
for the other hops' between requests (each side sleeps, then wakes up; on a virtual machine whose
idle cores halt, waking up is most of the difference).
Per hop it also splits the overhead (round trip less compute) as the client and the node measured
it (`mesh.session.HopTimes`, the node's part carried in its answers): the client's send path, the
node before and after its compute, the client's receive path, and the rest: the way between.
Per node it prints the peak resident memory against its span's weight bytes (issue 16: within
1.15x of the weights plus the KV budget).

With --hosts (root: network namespaces) a third arm runs the same three nodes on distinct hosts of a
test bed (tools/netbed.py), listening on every interface as the README starts them, with this
process on the same LAN; all arms alternate within each round.

    python benchmarks/bench_swarm.py [--quant int8] [--tokens 32] [--rounds 3] [--libp2p-only] [--hosts] [--layers 16] [--hidden 2048] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import astuple, dataclass, replace
from pathlib import Path

import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_local import model_or_build  # noqa: E402
from mesh.client import ClientOptions, GenerationReport  # noqa: E402
from mesh.join import connect  # noqa: E402
from mesh.session import HopTimes  # noqa: E402
from node.sessions import SessionLimits  # noqa: E402
from node.swarm import LocalSwarm  # noqa: E402
from shard.config import load_config  # noqa: E402
from shard.generate import generate_local  # noqa: E402
from shard.pipeline import LocalPipeline  # noqa: E402
from shard.sampling import SamplingParams  # noqa: E402
from shard.span import load_span  # noqa: E402

PROMPT_TOKENS = 128

ECHO_SERVER = textwrap.dedent("""
    import sys, time, trio
    BUSY_S = float(sys.argv[1])  # spun before each answer, as a node computes
    async def echo(stream):
        while data := await stream.receive_some(1 << 16):
            until = time.perf_counter() + BUSY_S
            while time.perf_counter() < until:
                pass
            await stream.send_all(data)
    async def main():
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        print(listeners[0].socket.getsockname()[1], flush=True)
        await trio.serve_listeners(echo, listeners)
    trio.run(main)
""")


def prompt_ids() -> list[int]:
    return torch.randint(3, 32000, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(1)).tolist()


def single_process(pipeline: LocalPipeline, tokens: int) -> list[float]:
    """Seconds per decoded token (the first decode step on) with the whole model in this process."""
    result = generate_local(pipeline, prompt_ids(), SamplingParams(max_new_tokens=tokens))
    return result.timings[1:]


async def swarm_decode(bootstrap: str, model_dir: Path, tokens: int, data_channel: bool) -> tuple[list[float], list]:
    """Seconds per decoded token through the swarm, timed as `generate_local` times them, and the hops."""
    async with connect(bootstrap=[bootstrap], model=model_dir, options=ClientOptions(data_channel=data_channel)) as client:
        await client.generate_text(prompt_ids=prompt_ids()[:8], params=SamplingParams(max_new_tokens=4))  # warm-up
        report, timings, after_prefill = GenerationReport([]), [], []
        started = time.perf_counter()
        async for _ in client.generate(prompt_ids=prompt_ids(), params=SamplingParams(max_new_tokens=tokens),
                                       report=report):
            now = time.perf_counter()
            timings.append(now - started)
            started = now
            if not after_prefill:
                after_prefill = [(hop.compute_s, hop.total_s, replace(hop.times)) for hop in report.hops]
    steps = len(timings) - 1
    decode = [HopDecode(hop.peer_id, hop.start, hop.end, (hop.compute_s - c) / steps, (hop.total_s - t) / steps,
                        HopTimes(*((now - then) / steps for now, then in zip(astuple(hop.times), astuple(times)))))
              for hop, (c, t, times) in zip(report.hops, after_prefill)]
    return timings[1:], decode


@dataclass
class HopDecode:
    """One hop's mean seconds per decode step: the node's own compute, the client's round trip, and
    where the round trip went besides compute."""

    peer_id: str
    start: int
    end: int
    compute_s: float
    round_trip_s: float
    times: HopTimes

    @property
    def between_s(self) -> float:
        """The round trip less compute and every part the two ends timed: the way between them."""
        return self.round_trip_s - self.compute_s - sum(astuple(self.times))


def resident(pids: list[int]) -> list[tuple[int, int]]:
    """Each process's (resident bytes now, peak resident bytes so far): VmRSS and VmHWM (Linux)."""
    result = []
    for pid in pids:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        result.append(tuple(int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")))
    return result


def span_weight_bytes(model_dir: Path, quant: str, bounds: list[tuple[int, int]]) -> list[int]:
    """Bytes of every tensor a node holds for each span (weights, scales, norms)."""
    result = []
    for start, end in bounds:
        span = load_span(model_dir, start, end, quant=quant)
        result.append(sum(t.numel() * t.element_size() for t in (*span.parameters(), *span.buffers())))
        del span
    return result


def span_decode_seconds(model_dir: Path, quant: str, bounds: list[tuple[int, int]], tokens: int) -> list[float]:
    """Median seconds per decode step of each span run in this process, as a node runs it."""
    result = []
    for start, end in bounds:
        span = load_span(model_dir, start, end, quant=quant)
        cache = span.new_cache(1, PROMPT_TOKENS + tokens + 1)
        hidden = torch.randn(1, PROMPT_TOKENS, span.config.hidden_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            span(hidden, cache)
            times = []
            for _ in range(tokens):
                step = hidden[:, :1] * 0.5
                began = time.perf_counter()
                span(step, cache)
                times.append(time.perf_counter() - began)
        result.append(statistics.median(times))
        del span, cache
    return result


async def tcp_round_trip(message_bytes: int, repeats: int = 200, busy_s: float = 0.0, idle_s: float = 0.0) -> float:
    """Median seconds for a `message_bytes` message to go to an echo process on loopback and back,
    less the `busy_s` the echo process spins before each answer; this side sleeps `idle_s` before each."""
    server = await trio.lowlevel.open_process([sys.executable, "-c", ECHO_SERVER, str(busy_s)],
                                              stdout=subprocess.PIPE)
    try:
        printed = b""
        with trio.fail_after(60):
            while not printed.endswith(b"\n"):
                printed += await server.stdout.receive_some()
        port = int(printed)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        payload, times = b"x" * message_bytes, []
        for _ in range(repeats):
            await trio.sleep(idle_s)
            started = time.perf_counter()
            await stream.send_all(payload)
            received = 0
            while received < message_bytes:
                received += len(await stream.receive_some(1 << 16))
            times.append(time.perf_counter() - started - busy_s)
        await stream.aclose()
        return statistics.median(times)
    finally:
        with trio.CancelScope(shield=True), trio.fail_after(10):
            server.kill()
            await server.wait()
            await server.stdout.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model directory (default: build the random ~1B model)")
    parser.add_argument("--quant", default="int8", choices=("none", "int8", "int4"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="alternating single-process and swarm runs")
    parser.add_argument("--libp2p-only", action="store_true", help="steps over libp2p streams, not the data channels")
    parser.add_argument("--hosts", action="store_true",
                        help="also a swarm whose nodes run on distinct hosts of a test bed (tools/netbed.py; root), "
                             "listening on every interface, measured in the same rounds")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads, in this process and in each node")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle node processes must not spin on the cores
    trio.run(run, args)


async def run(args: argparse.Namespace) -> None:
    """The rounds, then the per-hop and memory reports, with the swarms stopped before the spans run here."""
    with tempfile.TemporaryDirectory() as tmp:
        async with contextlib.AsyncExitStack() as stack:
            model_dir = model_or_build(args, tmp)
            pipeline = LocalPipeline.load(model_dir, quant=args.quant)
            generate_local(pipeline, prompt_ids()[:8], SamplingParams(max_new_tokens=4))  # warm-up, as the swarm gets
            node_args = ["--threads", str(args.threads)]
            swarms = {"loopback": await stack.enter_async_context(LocalSwarm(model_dir, quant=args.quant, work_dir=tmp,
                                                                             extra_args=node_args))}
            if args.hosts:
                bed = stack.enter_context(test_bed())
                swarms["hosts"] = await stack.enter_async_context(LocalSwarm(model_dir, quant=args.quant,
                                                                             extra_args=node_args, hosts=bed.hosts))
            for swarm in swarms.values():
                await swarm.start(swarm.spans(3), timeout=600)
            gc.collect()
            gc.freeze()  # as a node does: no full collection of the set-up's objects lands in a measured step
            local, times, hop_rounds = [], {name: [] for name in swarms}, {name: [] for name in swarms}
            for round_ in range(args.rounds):  # interleaved, so that the shared machine's drift hits all alike
                local += single_process(pipeline, args.tokens)
                for name, swarm in swarms.items():
                    step_times, hops = await swarm_decode(swarm.bootstrap[0], model_dir, args.tokens,
                                                          not args.libp2p_only)
                    times[name] += step_times
                    hop_rounds[name].append(hops)
                print(f"round {round_ + 1}: single process {1 / statistics.median(local):.2f} tok/s, " + ", ".join(
                    f"swarm on {name} {1 / statistics.median(t):.2f} tok/s" for name, t in times.items()), flush=True)
            loopback = swarms["loopback"].nodes
            memory = resident([node.pid for node in loopback])
            bounds = [tuple(int(b) for b in node.args[node.args.index("--blocks") + 1].split(":")) for node in loopback]
        del pipeline
        weights = span_weight_bytes(model_dir, args.quant, bounds)
        hops = {name: mean_hops(rounds) for name, rounds in hop_rounds.items()}
        spans = span_decode_seconds(model_dir, args.quant, [(h.start, h.end) for h in hops["loopback"]], args.tokens)
        hidden = load_config(model_dir).hidden_size
        busy_s = statistics.median(hop.compute_s for hop in hops["loopback"])
        idle_s = sum(hop.compute_s for hop in hops["loopback"]) - busy_s
        # one fp16 decode step plus framing: hot, and as a hop's (busy for its compute, idle for the others')
        tcp_s = (await tcp_round_trip(hidden * 2 + 200),
                 await tcp_round_trip(hidden * 2 + 200, 50, busy_s, idle_s), busy_s, idle_s)
    report(local, times, hops, spans, tcp_s, args)
    memory_report(bounds, weights, memory)


@contextlib.contextmanager
def test_bed():
    """Three hosts for the nodes; this process joins their LAN as a fourth (tools/netbed.py)."""
    from tools.netbed import NetBed

    reason = NetBed.unavailable()
    if reason:
        raise SystemExit(f"--hosts needs network namespaces: {reason}")
    with NetBed(3, join_here=True) as bed:
        print(f"test bed: nodes on {', '.join(h.addr for h in bed.hosts)}; this client on {bed.here_addr}", flush=True)
        yield bed


def mean_hops(rounds: list[list[HopDecode]]) -> list[HopDecode]:
    return [HopDecode(h.peer_id, h.start, h.end, statistics.fmean(r[i].compute_s for r in rounds),
                      statistics.fmean(r[i].round_trip_s for r in rounds),
                      HopTimes(*map(statistics.fmean, zip(*(astuple(r[i].times) for r in rounds)))))
            for i, h in enumerate(rounds[0])]


def report(local: list[float], swarms: dict[str, list[float]], hops: dict[str, list[HopDecode]],
           spans: list[float], tcp_s: tuple[float, float, float, float], args) -> None:
    """Median and mean seconds per token of each; the ratio is of medians (the mean is shown beside it)."""
    local_s = statistics.median(local)
    print(f"\nquant {args.quant}, batch 1, {PROMPT_TOKENS}-token prompt, {args.rounds} x {args.tokens} tokens; "
          f"threads {torch.get_num_threads()}")
    print(f"{'':<46}{'ms/token':>10}{'mean ms':>9}{'tok/s':>9}{'ratio':>8}{'ratio of means':>16}")
    channel = "libp2p only" if args.libp2p_only else "data channel"
    rows = [("single process", local)] + [(f"3-node swarm, {'127.0.0.1' if name == 'loopback' else 'distinct hosts'} "
                                           f"({channel})", values) for name, values in swarms.items()]
    for name, values in rows:
        median, mean = statistics.median(values), statistics.fmean(values)
        print(f"{name:<46}{median * 1e3:>10.1f}{mean * 1e3:>9.1f}{1 / median:>9.2f}{local_s / median:>8.2f}"
              f"{statistics.fmean(local) / mean:>16.2f}")
    hot_s, busy_rt_s, busy_s, idle_s = tcp_s
    for name, values in swarms.items():
        overhead = (statistics.median(values) - local_s) / len(hops[name])
        print(f"{name}: per-hop overhead {overhead * 1e3:.2f} ms vs plain trio TCP round trip on loopback "
              f"{hot_s * 1e3:.3f} ms ({overhead / hot_s:.1f}x); {busy_rt_s * 1e3:.3f} ms as a hop's, the echo "
              f"busy {busy_s * 1e3:.1f} ms before each answer and idle {idle_s * 1e3:.1f} ms between "
              f"({overhead / busy_rt_s:.1f}x)")
        print("  per decode step (means, ms):    node compute   same span here   round trip   wire (round trip - compute)")
        for hop, here in zip(hops[name], spans):
            print(f"    hop {hop.peer_id[-8:]} [{hop.start:>2}, {hop.end:>2}):   {hop.compute_s * 1e3:>9.2f}      "
                  f"{here * 1e3:>11.2f}      {hop.round_trip_s * 1e3:>7.2f}      "
                  f"{(hop.round_trip_s - hop.compute_s) * 1e3:>8.2f}")
        print("  where the wire time went (ms): client send + node before compute + node after + client receive "
              "+ between (sealing, kernel, wake-ups, the answer's framing)")
        for hop in hops[name]:
            t = hop.times
            print(f"    hop {hop.peer_id[-8:]}:  {(hop.round_trip_s - hop.compute_s) * 1e3:.2f} = {t.send * 1e3:.2f} "
                  f"+ {t.node_before * 1e3:.2f} + {t.node_after * 1e3:.2f} + {t.receive * 1e3:.2f} "
                  f"+ {hop.between_s * 1e3:.2f}")


def memory_report(bounds: list[tuple[int, int]], weights: list[int], memory: list[tuple[int, int]]) -> None:
    """Resident memory of each loopback node after the rounds, and its peak, against its span's
    tensors, and the peak against issue 16's bound: the tensors plus the node's KV budget
    (`SessionLimits.kv_cache_bytes`, --kv-cache-bytes, 1 GiB by default), within 1.15x. The budget
    is a ceiling a node only reaches with many long sessions; this run's sessions hold a few MB of
    cache, so the rest is the runtime (Python, torch, libp2p) and what loading left behind."""
    budget = SessionLimits().kv_cache_bytes
    print("\nnode memory (loopback swarm): blocks   span tensors   resident (ratio)   peak resident (ratio)"
          f"   peak / (tensors + {budget / 2**30:g} GiB KV budget)")
    for (start, end), weight, (now, peak) in zip(bounds, weights, memory):
        print(f"  [{start:>2}, {end:>2}){'':<26}{weight / 2**20:>9.0f} MiB{now / 2**20:>10.0f} MiB ({now / weight:.2f})"
              f"{peak / 2**20:>12.0f} MiB ({peak / weight:.2f}){peak / (weight + budget):>14.2f}")


if __name__ == "__main__":
    main()
