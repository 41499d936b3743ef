"""The compiled, chunk-invariant attention (shard/csrc/attention.c) against torch's, in one run.

Hearth's attention computes each query row alone, in key order, so a position's output does not
depend on the step it came in (what exact prefix reuse and speculation rely on). This measures what
that costs against what the blocks ran before: torch's fused `scaled_dot_product_attention` for a
prefill chunk, and two matmuls and a softmax for a decode step. SmolLM2-135M's shape (9 query
heads, 3 kv heads, head size 64) by default; the arms alternate, medians of --repeats.

    python benchmarks/bench_attention.py [--heads 9] [--kv-heads 3] [--head-dim 64] [--repeats 5] [--record]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import write_section  # noqa: E402
from shard import qkernels  # noqa: E402


def decode_torch(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    B, H, _, hd = q.shape
    grouped = q.reshape(B, keys.shape[1], H // keys.shape[1], hd)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).mul_(hd**-0.5)
    return torch.matmul(scores.softmax(dim=-1), values)


def timed(fn, repeats: int, inner: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - started) / inner)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    if not qkernels.available():
        sys.exit(f"no compiled kernels: {qkernels.why_unavailable()}")
    torch.manual_seed(0)
    H, KV, hd = args.heads, args.kv_heads, args.head_dim
    lines = [f"One layer's attention, {H} query heads / {KV} kv heads of {hd}, {torch.get_num_threads()} threads "
             f"(medians of {args.repeats}):", "",
             "| step | context | compiled (chunk-invariant) | torch | ratio | max difference |", "|---|---|---|---|---|---|"]
    for tokens, context in ((1, 128), (1, 1024), (1, 4096), (128, 128), (512, 512), (1024, 1024)):
        q = torch.randn(1, H, tokens, hd)
        keys, values = torch.randn(1, KV, context, hd), torch.randn(1, KV, context, hd)
        if tokens == 1:
            theirs = lambda: decode_torch(q, keys, values)  # noqa: E731
        else:
            mask = torch.ones(tokens, context, dtype=torch.bool).tril(context - tokens)
            theirs = lambda: F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)  # noqa: E731
        ours = lambda: qkernels.attend(q, keys, values, None)  # noqa: E731
        inner = 200 if tokens == 1 else 3
        mine, other = [], []
        for _ in range(2):
            mine.append(timed(ours, args.repeats, inner))
            other.append(timed(theirs, args.repeats, inner))
        a, b = min(mine), min(other)
        diff = (ours().transpose(1, 2) - theirs().reshape(1, H, tokens, hd)).abs().max().item()
        kind = "decode" if tokens == 1 else f"prefill {tokens}"
        lines.append(f"| {kind} | {context} | {a * 1e6:.0f} us | {b * 1e6:.0f} us | {a / b:.2f}x | {diff:.1e} |")
    print("\n".join(lines))
    if args.record:
        command = "python benchmarks/bench_attention.py " + " ".join(sys.argv[1:])
        write_section("## Chunk-invariant attention (bench_attention.py)\n\n"
                      f"`{command.strip()}` on this machine ({time.strftime('%Y-%m-%d')}):\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
