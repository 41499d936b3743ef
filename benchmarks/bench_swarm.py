"""Decode speed through a 3-node loopback swarm vs the same model in one process, in one run.

Builds the random ~1B Llama of bench_local.py (or takes --model DIR), then measures decode
tokens/s at batch 1 after a 128-token prompt: (1) one process running the whole model with the
same quantization; (2) three `hearth node` processes on 127.0.0.1, each serving a third, and a
client in this process. Also measures a plain trio TCP round trip between two processes with a
message of one hop's size, so the swarm's per-hop overhead can be read against it.

    python benchmarks/bench_swarm.py [--quant int8] [--tokens 32] [--layers 16] [--hidden 2048] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_local import save_model  # noqa: E402
from mesh.client import ClientOptions  # noqa: E402
from mesh.join import connect  # noqa: E402
from node.swarm import LocalSwarm  # noqa: E402
from shard.config import load_config  # noqa: E402
from shard.generate import generate_local  # noqa: E402
from shard.pipeline import LocalPipeline  # noqa: E402
from shard.sampling import SamplingParams  # noqa: E402

PROMPT_TOKENS = 128

ECHO_SERVER = textwrap.dedent("""
    import sys, trio
    async def echo(stream):
        while data := await stream.receive_some(1 << 16):
            await stream.send_all(data)
    async def main():
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        print(listeners[0].socket.getsockname()[1], flush=True)
        await trio.serve_listeners(echo, listeners)
    trio.run(main)
""")


def prompt_ids() -> list[int]:
    return torch.randint(3, 32000, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(1)).tolist()


def single_process(model_dir: Path, quant: str, tokens: int) -> float:
    """Seconds per decoded token with the whole model in this process."""
    pipeline = LocalPipeline.load(model_dir, quant=quant)
    result = generate_local(pipeline, prompt_ids(), SamplingParams(max_new_tokens=tokens))
    return statistics.median(result.timings[2:])


async def swarm_decode(bootstrap: str, model_dir: Path, tokens: int) -> tuple[float, list]:
    async with connect(bootstrap=[bootstrap], model=model_dir, options=ClientOptions()) as client:
        await client.generate_text(prompt_ids=prompt_ids()[:8], params=SamplingParams(max_new_tokens=4))  # warm-up
        report = await client.generate_text(prompt_ids=prompt_ids(), params=SamplingParams(max_new_tokens=tokens))
    return report.decode_s / (len(report.token_ids) - 1), report.hops


async def tcp_round_trip(message_bytes: int, repeats: int = 200) -> float:
    """Median seconds for a `message_bytes` message to go to an echo process on loopback and back."""
    server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        payload, times = b"x" * message_bytes, []
        for _ in range(repeats):
            started = time.perf_counter()
            await stream.send_all(payload)
            received = 0
            while received < message_bytes:
                received += len(await stream.receive_some(1 << 16))
            times.append(time.perf_counter() - started)
        await stream.aclose()
        return statistics.median(times)
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model directory (default: build the random ~1B model)")
    parser.add_argument("--quant", default="int8", choices=("none", "int8", "int4"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads, in this process and in each node")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle node processes must not spin on the cores
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            model_dir = Path(tmp) / "model"
            print(f"building random Llama h{args.hidden} L{args.layers} ...", flush=True)
            save_model(model_dir, args)
        local_s = single_process(model_dir, args.quant, args.tokens)
        print(f"single process: {1 / local_s:.2f} tok/s", flush=True)
        with LocalSwarm(model_dir, quant=args.quant, work_dir=tmp, extra_args=["--threads", str(args.threads)]) as swarm:
            swarm.start(swarm.spans(3), timeout=600)
            swarm_s, hops = trio.run(swarm_decode, swarm.bootstrap[0], model_dir, args.tokens)
        hidden = load_config(model_dir).hidden_size
        tcp_s = trio.run(tcp_round_trip, hidden * 2 + 200)  # one fp16 decode step plus framing
    report(local_s, swarm_s, hops, tcp_s, args)


def report(local_s: float, swarm_s: float, hops: list, tcp_s: float, args) -> None:
    overhead = (swarm_s - local_s) / len(hops)
    print(f"\nquant {args.quant}, batch 1, {PROMPT_TOKENS}-token prompt, {args.tokens} tokens; threads {torch.get_num_threads()}")
    print(f"{'':<28}{'ms/token':>10}{'tok/s':>9}{'ratio':>8}")
    print(f"{'single process':<28}{local_s * 1e3:>10.1f}{1 / local_s:>9.2f}{1.0:>8.2f}")
    print(f"{'3-node swarm (libp2p)':<28}{swarm_s * 1e3:>10.1f}{1 / swarm_s:>9.2f}{local_s / swarm_s:>8.2f}")
    print(f"per-hop overhead {overhead * 1e3:.2f} ms vs plain trio TCP round trip {tcp_s * 1e3:.3f} ms "
          f"({overhead / tcp_s:.1f}x)")
    for hop in hops:
        print(f"  hop {hop.peer_id[-8:]} [{hop.start}, {hop.end}): compute {hop.compute_s:.3f} s, "
              f"round trips {hop.total_s:.3f} s")


if __name__ == "__main__":
    main()
