"""Micro-benchmark of every quantized matmul path of `shard/quant.py`.

For each layer shape (in x out) and row count M (tokens x sequences), times, as the median of
interleaved repeats at a fixed thread count:
- fp32 `F.linear` (the baseline),
- int8: the compiled int8 x int8 kernel (shard/csrc, up to INT8_COMPILED_MAX_ROWS rows), torch's
  `_int_mm` with the same per-row int8 activations, the packed weight-only kernel (bf16
  activations) and the dequantize fallback,
- int4: the compiled int4 x int8 kernel, torch's packed kernel (bf16 activations) and the
  dequantize fallback,
prints the path `Int8Linear` / `Int4Linear` chose, and checks each path against the fp32
dequantize reference (relative L2 error). Weights stay hot between calls (one layer, reused), as
in a prefill or a batch of rows; bench_vs_llamacpp.py measures cold, whole-model decoding.

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

from shard import qkernels, quant
from shard.quant import Int4Linear, Int8Linear

PATHS = ("fp32", "i8 compiled", "i8 int_mm", "i8 packed", "i8 dequant", "i4 compiled", "i4 packed",
         "i4 dequant")


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


def packed_int4(weight: torch.Tensor, group_size: int) -> Int4Linear:
    """The layer as it is where the compiled kernels are absent (torch's packed int4 layout)."""
    compiled = quant._has_compiled
    quant._has_compiled = lambda: False
    try:
        return Int4Linear.from_float(weight, None, group_size)
    finally:
        quant._has_compiled = compiled


def path_functions(x, weight, int8: Int8Linear, int4: Int4Linear, int4_packed: Int4Linear) -> dict[str, Callable]:
    """The timed callables for one input; each path only where this machine has it."""
    portable = int4.portable()
    fns = {
        "fp32": lambda: F.linear(x, weight),
        "i8 dequant": lambda: quant.int8_dequant_matmul(x, int8.weight, int8.scales),
        "i4 dequant": lambda: quant.int4_dequant_matmul(x, *portable, int4.group_size),
    }
    if quant._has_aten_op(quant._INT8_INT8_MM):
        fns["i8 int_mm"] = lambda: quant.int8_w8a8_matmul(x, int8.weight, int8.scales)
    if int8.compiled() is not None:
        fns["i8 compiled"] = lambda: int8.compiled().linear(x)
    if int4.compiled() is not None:
        fns["i4 compiled"] = lambda: int4.compiled().linear(x)
    if quant._has_aten_op(quant._INT8_MM):
        mm8 = getattr(torch.ops.aten, quant._INT8_MM)
        fns["i8 packed"] = lambda: mm8(x.to(torch.bfloat16), int8.weight, int8.scales).float()
    if int4_packed.kernel_weight is not None:
        mm4 = getattr(torch.ops.aten, quant._INT4_MM)
        fns["i4 packed"] = lambda: mm4(
            x.to(torch.bfloat16), int4_packed.kernel_weight, int4.group_size, int4_packed.kernel_scale_zeros
        ).float()
    return fns


def path_errors(fns: dict[str, Callable]) -> str:
    errs = []
    for name in PATHS[1:]:
        kind = name.split()[0]
        if name in fns and not name.endswith("dequant"):
            errs.append(f"{name.split()[1]} {rel_err(fns[name](), fns[f'{kind} dequant']()):.1e}")
    return " ".join(errs)


def bench_shape(in_f: int, out_f: int, rows: list[int], args: argparse.Namespace) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_f, in_f, generator=gen) * 0.02
    int8 = Int8Linear.from_float(weight)
    int4 = Int4Linear.from_float(weight, None, args.group_size)
    int4_packed = packed_int4(weight, args.group_size)
    print(f"\nin={in_f} out={out_f}  (ms, median of {args.repeats}; int4 group {args.group_size})")
    header = "".join(f"{p:>12}" for p in PATHS)
    print(f"{'M':>5}{header}  {'int8 path':>10} {'int4 path':>10}  fp32/chosen i8 i4  rel err vs dequant")
    for m in rows:
        x = torch.randn(m, in_f, generator=gen)
        fns = path_functions(x, weight, int8, int4, int4_packed)
        ms = time_interleaved(fns, args.repeats)
        cells = "".join(f"{ms[p]:>12.3f}" if p in ms else f"{'-':>12}" for p in PATHS)
        int8_path, int4_path = int8.path(m), int4.path(m)
        speedups = f"{ms['fp32'] / ms['i8 ' + int8_path]:.2f}x {ms['fp32'] / ms['i4 ' + int4_path]:.2f}x"
        print(f"{m:>5}{cells}  {int8_path:>10} {int4_path:>10}  {speedups}  {path_errors(fns)}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, kernels {qkernels.describe()}, "
          f"INT8_COMPILED_MAX_ROWS={quant.INT8_COMPILED_MAX_ROWS}, INT8_KERNEL_MAX_ROWS={quant.INT8_KERNEL_MAX_ROWS}, "
          f"load {os.getloadavg()[0]:.2f}")
    with torch.inference_mode():
        for shape in args.shapes.split(","):
            in_f, out_f = (int(v) for v in shape.lower().split("x"))
            bench_shape(in_f, out_f, rows, args)
    # Other processes on these cores inflate 2-thread timings many times over: check this.
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
