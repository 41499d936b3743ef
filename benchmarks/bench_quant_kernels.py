"""Micro-benchmark of the weight-only quantized matmul paths of `shard/quant.py`.

For each layer shape (in x out) and row count M (tokens x sequences), times, as the median of
interleaved repeats at a fixed thread count:
- fp32 `F.linear` (the baseline),
- int8: packed kernel with bf16 activations, dequantize fallback, and `Int8Linear.forward`
  with the path it chose,
- int4 (group 32): the same three,
and checks each kernel path against the fp32 dequantize reference (relative L2 error).
Weights stay hot between calls (one layer, reused), as in a prefill or a batch of rows.

    .venv/bin/python benchmarks/bench_quant_kernels.py [--threads 2] [--repeats 7]
        [--rows 1,8,16,32,48,64,96,128,256] [--shapes 4096x4096,2048x5632] [--group-size 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from shard import quant
from shard.quant import Int4Linear, Int8Linear

PATHS = ("fp32", "i8 kernel", "i8 dequant", "i8 forward", "i4 kernel", "i4 dequant", "i4 forward")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", default="1,8,16,32,48,64,96,128,256")
    parser.add_argument("--shapes", default="4096x4096,2048x5632", help="IN x OUT, comma-separated")
    parser.add_argument("--group-size", type=int, default=32)
    return parser.parse_args()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds per function; one warm-up call each, then repeats in turn."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def path_functions(x, weight, int8: Int8Linear, int4: Int4Linear) -> dict[str, Callable]:
    """The timed callables for one input; kernel entries only where this torch has the ops."""
    portable = int4.portable()
    fns = {
        "fp32": lambda: F.linear(x, weight),
        "i8 dequant": lambda: quant.int8_dequant_matmul(x, int8.weight, int8.scales),
        "i8 forward": lambda: int8(x),
        "i4 dequant": lambda: quant.int4_dequant_matmul(x, *portable, int4.group_size),
        "i4 forward": lambda: int4(x),
    }
    if quant._has_aten_op(quant._INT8_MM):
        mm8 = getattr(torch.ops.aten, quant._INT8_MM)
        fns["i8 kernel"] = lambda: mm8(x.to(torch.bfloat16), int8.weight, int8.scales).float()
    if int4.kernel_weight is not None:
        mm4 = getattr(torch.ops.aten, quant._INT4_MM)
        fns["i4 kernel"] = lambda: mm4(
            x.to(torch.bfloat16), int4.kernel_weight, int4.group_size, int4.kernel_scale_zeros
        ).float()
    return fns


def kernel_errors(fns: dict[str, Callable]) -> str:
    errs = []
    for kind in ("i8", "i4"):
        if f"{kind} kernel" in fns:
            err = rel_err(fns[f"{kind} kernel"](), fns[f"{kind} dequant"]())
            errs.append(f"{kind} {err:.1e}")
    return " ".join(errs)


def bench_shape(in_f: int, out_f: int, rows: list[int], args: argparse.Namespace) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_f, in_f, generator=gen) * 0.02
    int8 = Int8Linear.from_float(weight)
    int4 = Int4Linear.from_float(weight, None, args.group_size)
    print(f"\nin={in_f} out={out_f}  (ms, median of {args.repeats}; int4 group {args.group_size})")
    header = "".join(f"{p:>11}" for p in PATHS)
    print(f"{'M':>5}{header}  {'int8 path':>10} {'int4 path':>10}  kernel-vs-dequant rel err"
          "  speedup fp32/forward i8/i4")
    for m in rows:
        x = torch.randn(m, in_f, generator=gen)
        fns = path_functions(x, weight, int8, int4)
        ms = time_interleaved(fns, args.repeats)
        cells = "".join(f"{ms[p]:>11.2f}" if p in ms else f"{'-':>11}" for p in PATHS)
        int8_path = "kernel" if int8.uses_kernel(m) else "dequant"
        int4_path = "kernel" if int4.kernel_weight is not None else "dequant"
        speedups = f"{ms['fp32'] / ms['i8 forward']:.2f}x/{ms['fp32'] / ms['i4 forward']:.2f}x"
        print(f"{m:>5}{cells}  {int8_path:>10} {int4_path:>10}  {kernel_errors(fns)}  {speedups}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"INT8_KERNEL_MAX_ROWS={quant.INT8_KERNEL_MAX_ROWS}, load {os.getloadavg()[0]:.2f}")
    with torch.inference_mode():
        for shape in args.shapes.split(","):
            in_f, out_f = (int(v) for v in shape.lower().split("x"))
            bench_shape(in_f, out_f, rows, args)
    # Other processes on these cores inflate 2-thread timings many times over: check this.
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
