"""Weights from peers (issue 21): how long empty nodes take to join, and what a download costs decode.

Builds issue 16's random 0.92B Llama (hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 5632,
vocab 49152, untied head; fp32, as bench_vs_llamacpp.py builds it) as a Hugging Face directory, or
takes --model DIR, writes its v2 manifest (`shard.manifest.write_manifest`), then in one run:

1. **Join time.** One `hearth node --model DIR` holds the whole model (blocks 0:N, uploads capped
   by --max-upload, the node's default 32 MiB/s). Three empty `hearth node --model-digest HEX`
   nodes, spans splitting the model in three, start at once; for each, the seconds from their start
   to its `blocks A:B: fetched N bytes from peers` line and to its `listening on` line (fetched,
   quantized, measured and serving), and the bytes it fetched. Against: `cp -r --reflink=never`
   of the same bytes on this disk (the three fetched caches, sparse: only their fetched pieces),
   and of the whole model directory (both from the page cache, neither synced; `sync` timed apart).
2. **Decode under a neighbour's download.** The three joined nodes are stopped, so the holder is
   the only node serving the model and the only one holding its pieces: it serves every block of
   the generation (the client in this process runs the embeddings and LM head, as in
   bench_swarm.py) *and* it is the one that uploads. Rounds alternate (ABBA) a generation (128-token
   prompt, --tokens greedy tokens, decode tokens/s from the median per token) with no download, and
   the same generation while a fresh empty node fetches --download-span from the holder (started
   first, the generation begins once its first pieces are in; the round says if the download ended
   before the generation did). Per arm: the holder's CPU per token and the downloader's, from
   /proc, and the download's rate during the generation. Everything shares this machine's cores.

    python benchmarks/bench_fetch.py [--model DIR | --hidden 2048 --layers 16] [--quant int8]
                                     [--threads 1] [--tokens 64] [--rounds 3] [--max-upload 32] [--record]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_swarm import PROMPT_TOKENS, swarm_decode  # noqa: E402
from benchmarks.bench_vs_llamacpp import build_model  # noqa: E402
from benchmarks.results import write_section  # noqa: E402
from node.swarm import LocalSwarm, NodeProcess  # noqa: E402
from shard.manifest import write_manifest  # noqa: E402
from shard.model_dir import QUANT_CHOICES, ModelDir  # noqa: E402
from shard.pipeline import split_points  # noqa: E402

MB = 1e6
MiB = 2**20
JOIN_TIMEOUT_S = 1800.0


def dir_bytes(path: Path, allocated: bool = False) -> int:
    """Bytes of the files under `path`: their sizes, or with `allocated` the blocks they hold (a sparse
    cache's fetched pieces)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                stat = os.stat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            total += stat.st_blocks * 512 if allocated else stat.st_size
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fetched_bytes(node: NodeProcess, start: int, end: int) -> tuple[int, int]:
    """(bytes fetched from peers, bytes already here) from the node's summary line."""
    line = next(line for line in node.lines if line.startswith(f"blocks {start}:{end}: fetched"))
    fetched = int(line.split(" fetched ", 1)[1].split()[0])
    here = int(line.split(", ", 1)[1].split()[0])
    return fetched, here


def timed_cp(sources: list[Path], target: Path) -> tuple[float, float]:
    """(seconds of `cp -r --reflink=never` of `sources` into `target`, seconds of the `sync` after it)."""
    target.mkdir(parents=True)
    started = time.perf_counter()
    subprocess.run(["cp", "-r", "--reflink=never", *map(str, sources), str(target)], check=True)
    copied = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run(["sync"], check=True)
    return copied, time.perf_counter() - started


async def join(swarm: LocalSwarm, digest: str, spans: list[tuple[int, int]], out: list[str]) -> dict:
    """Start the three empty nodes at once; each one's seconds to its fetched line and to serving."""
    say = lambda text: (print(text, flush=True), out.append(text))  # noqa: E731
    began = trio.current_time()
    nodes = [await swarm.add(a, b, digest=digest) for a, b in spans]
    times: dict[str, tuple[float, float]] = {}

    async def watch(node: NodeProcess, a: int, b: int) -> None:
        await node.wait_for(f"blocks {a}:{b}: fetched", JOIN_TIMEOUT_S)
        fetched_at = trio.current_time() - began
        await node.wait_ready(JOIN_TIMEOUT_S)
        times[node.name] = (fetched_at, trio.current_time() - began)

    async with trio.open_nursery() as nursery:
        for node, (a, b) in zip(nodes, spans):
            nursery.start_soon(watch, node, a, b)
    wall = trio.current_time() - began
    rows = []
    for node, (a, b) in zip(nodes, spans):
        fetched, here = fetched_bytes(node, a, b)
        fetched_at, ready_at = times[node.name]
        rows.append((node, a, b, fetched, here, fetched_at, ready_at))
        say(f"  {node.name} blocks {a:>2}:{b:<2}  fetched {fetched / MB:>8.1f} MB ({here / MB:.1f} MB were here) "
            f"in {fetched_at:6.1f} s, serving at {ready_at:6.1f} s")
    return {"nodes": nodes, "rows": rows, "wall": wall}


async def decode_rounds(args, swarm: LocalSwarm, holder: NodeProcess, model_dir: Path, digest: str,
                        span: tuple[int, int], piece_bytes: int, work: Path, out: list[str]) -> dict:
    """Alternating rounds: a generation alone, and one while an empty node fetches `span` from the holder."""
    say = lambda text: (print(text, flush=True), out.append(text))  # noqa: E731
    arms = {"alone": [], "download": []}
    cpu = {"alone": [], "download": []}  # (holder CPU s, downloader CPU s, wall s) per generation
    rates, overran = [], 0
    for round_ in range(args.rounds):
        order = ("alone", "download") if round_ % 2 == 0 else ("download", "alone")
        for arm in order:
            downloader = None
            if arm == "download":
                downloader = await swarm.add(*span, digest=digest)
                cache = work / f"{downloader.name}.cache"
                with trio.fail_after(300):  # its first pieces are in: the upload is under way
                    while dir_bytes(cache, allocated=True) < 2 * piece_bytes and not any(
                            line.startswith(f"blocks {span[0]}:{span[1]}: fetched") for line in downloader.lines):
                        if not downloader.running:
                            raise RuntimeError("the downloader exited:\n" + "\n".join(downloader.lines[-20:]))
                        await trio.sleep(0.1)
                held_before = dir_bytes(cache, allocated=True)
            holder_cpu, down_cpu = cpu_seconds(holder.pid), cpu_seconds(downloader.pid) if downloader else 0.0
            started = time.perf_counter()
            timings, hops = await swarm_decode(holder.addr, model_dir, args.tokens, True)
            wall = time.perf_counter() - started
            holder_cpu = cpu_seconds(holder.pid) - holder_cpu
            route = {hop.peer_id for hop in hops}
            if route != {holder.peer_id}:
                raise RuntimeError(f"the generation went through {route}, not the holder {holder.peer_id} alone")
            note = ""
            if downloader is not None:
                down_cpu = cpu_seconds(downloader.pid) - down_cpu
                moved = dir_bytes(cache, allocated=True) - held_before
                done = any(line.startswith(f"blocks {span[0]}:{span[1]}: fetched") for line in downloader.lines)
                overran += done
                rates.append(moved / wall)
                note = (f" (download {moved / wall / MB:.1f} MB/s during it"
                        f"{'; FINISHED before the generation did' if done else ''})")
                await downloader.stop()
                shutil.rmtree(cache, ignore_errors=True)
            arms[arm] += timings
            cpu[arm].append((holder_cpu, down_cpu, wall))  # connect, warm-up, prompt and decode
            say(f"round {round_ + 1} {arm:<8}: {1 / statistics.median(timings):6.2f} tok/s "
                f"(median {statistics.median(timings) * 1e3:.1f} ms/token){note}")
    return {"arms": arms, "cpu": cpu, "rates": rates, "overran": overran}


async def run(args) -> list[str]:
    out: list[str] = []
    say = lambda text="": (print(text, flush=True), out.append(text))  # noqa: E731
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        if args.model is None:
            print(f"building the random Llama h{args.hidden} L{args.layers} (fp32) ...", flush=True)
            started = time.perf_counter()
            model_dir = build_model(work / "model", args.hidden, args.layers)
            print(f"  built in {time.perf_counter() - started:.0f} s", flush=True)
        else:
            model_dir = args.model
        started = time.perf_counter()
        write_manifest(model_dir)
        model = ModelDir(model_dir)
        digest, manifest = model.digest, model.identity
        n_layers = model.config.num_layers
        model_bytes = dir_bytes(model_dir)
        print(f"manifest written in {time.perf_counter() - started:.0f} s; digest {digest}", flush=True)
        spans = split_points(n_layers, 3)
        download_span = spans[args.download_span]
        node_args = ["--threads", str(args.threads)]
        say(f"model {model_dir.name if args.model else 'random Llama h%d L%d fp32' % (args.hidden, args.layers)}: "
            f"{n_layers} blocks, {model_bytes / MB:.0f} MB on disk, pieces of {manifest.piece_bytes // MiB} MiB; "
            f"nodes --quant {args.quant} --threads {args.threads}, holder --max-upload {args.max_upload:g} MiB/s")
        async with LocalSwarm(model_dir, quant=args.quant, work_dir=work, extra_args=node_args) as swarm:
            holder = await swarm.add(0, n_layers, extra_args=["--max-upload", str(args.max_upload)])
            started = trio.current_time()
            await holder.wait_ready(JOIN_TIMEOUT_S)
            say(f"holder (blocks 0:{n_layers}, from its files) serving after {trio.current_time() - started:.0f} s")
            say(f"\n1. join: three empty --model-digest nodes started at once, spans {spans}")
            joined = await join(swarm, digest, spans, out)
            for node in joined["nodes"]:
                await node.stop()
            caches = [work / f"{node.name}.cache" for node in joined["nodes"]]
            span_bytes = sum(dir_bytes(cache, allocated=True) for cache in caches)
            cp_spans, sync_spans = timed_cp(caches, work / "cp-spans")
            shutil.rmtree(work / "cp-spans")
            cp_whole, sync_whole = timed_cp([model_dir], work / "cp-whole")
            shutil.rmtree(work / "cp-whole")
            for cache in caches:
                shutil.rmtree(cache)
            fetched = sum(row[3] for row in joined["rows"])
            last_fetch = max(row[5] for row in joined["rows"])
            wall = joined["wall"]
            say(f"  all three serving after {wall:.1f} s (last fetched line at {last_fetch:.1f} s); fetched "
                f"{fetched / MB:.1f} MB in all: {fetched / wall / MB:.1f} MB/s over the join, "
                f"{fetched / last_fetch / MB:.1f} MB/s to the last fetched line "
                f"(cap: the holder's {args.max_upload:g} MiB/s = {args.max_upload * MiB / MB:.1f} MB/s)")
            say(f"  cp of the three caches' {span_bytes / MB:.1f} MB: {cp_spans:.2f} s "
                f"({span_bytes / cp_spans / MB:.0f} MB/s; sync after it {sync_spans:.2f} s); join / cp = "
                f"{wall / cp_spans:.1f}x, fetch / cp = {last_fetch / cp_spans:.1f}x")
            say(f"  cp of the whole model's {model_bytes / MB:.1f} MB: {cp_whole:.2f} s "
                f"({model_bytes / cp_whole / MB:.0f} MB/s; sync after it {sync_whole:.2f} s); join / cp = "
                f"{wall / cp_whole:.1f}x")

            say(f"\n2. decode under a neighbour's download: the holder ({holder.peer_id[-8:]}, blocks 0:{n_layers}) "
                f"serves every block of the generation and is the only holder of pieces; the downloader fetches "
                f"blocks {download_span[0]}:{download_span[1]} from it; client here (embeddings, LM head); "
                f"{PROMPT_TOKENS}-token prompt, {args.tokens} tokens, {args.rounds} rounds of each")
            result = await decode_rounds(args, swarm, holder, model_dir, digest, download_span,
                                         manifest.piece_bytes, work, out)
        alone, loaded = result["arms"]["alone"], result["arms"]["download"]
        say(f"\n{'':<26}{'ms/token':>10}{'mean ms':>9}{'tok/s':>8}{'ratio':>7}{'ratio of means':>16}"
            f"{'holder CPU/gen':>16}{'downloader CPU':>16}")
        for arm, values in (("alone", alone), ("neighbour downloading", loaded)):
            rows = result["cpu"]["alone" if arm == "alone" else "download"]
            holder_per = statistics.fmean(r[0] for r in rows)
            down_share = sum(r[1] for r in rows) / sum(r[2] for r in rows)
            say(f"{arm:<26}{statistics.median(values) * 1e3:>10.1f}{statistics.fmean(values) * 1e3:>9.1f}"
                f"{1 / statistics.median(values):>8.2f}{statistics.median(alone) / statistics.median(values):>7.2f}"
                f"{statistics.fmean(alone) / statistics.fmean(values):>16.2f}{holder_per:>14.1f} s"
                f"{down_share:>14.0%}")
        ratio = statistics.median(alone) / statistics.median(loaded)
        say(f"decode while a neighbour downloads: {ratio:.2f}x of decode alone (target >= 0.8x); download "
            f"{statistics.fmean(result['rates']) / MB:.1f} MB/s during the generations (mean of {len(result['rates'])})"
            + (f"; in {result['overran']} round(s) the download finished first" if result["overran"] else ""))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model directory (default: build issue 16's random Llama)")
    parser.add_argument("--hidden", type=int, default=2048, help="of the built model")
    parser.add_argument("--layers", type=int, default=16, help="of the built model")
    parser.add_argument("--quant", default="int8", choices=QUANT_CHOICES)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each node and in this process")
    parser.add_argument("--tokens", type=int, default=64, help="decoded tokens per generation")
    parser.add_argument("--rounds", type=int, default=3, help="of each arm in part 2")
    parser.add_argument("--max-upload", type=float, default=32.0, metavar="MiB/S", help="the holder's upload cap")
    parser.add_argument("--download-span", type=int, default=1, choices=(0, 1, 2),
                        help="which third of the model part 2's downloader fetches")
    parser.add_argument("--work", type=Path, help="where the temporary model, caches and copies go (default: $TMPDIR)")
    parser.add_argument("--record", action="store_true", help="write the figures into benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle node processes must not spin on the cores
    out = trio.run(run, args)
    if args.record:
        command = " ".join(["python", "benchmarks/bench_fetch.py", *sys.argv[1:]])
        write_section("## Weights from peers (issue 21; bench_fetch.py)\n\n"
                      f"Command: `{command}`\n\n```\n" + "\n".join(out).strip("\n") + "\n```\n")


if __name__ == "__main__":
    main()
