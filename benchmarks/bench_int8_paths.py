"""The two int8 paths of `shard.quant.Int8Linear`, measured in one run (issue 16's first step).

"weight-only": torch's packed kernel with bf16 activations for up to 48 rows, a dequantizing fp32
GEMM beyond (what int8 ran before). "int8 x int8" (the default where torch has `_int_mm`): each
activation row quantized to int8 by its own absmax and an exact int32 product
(`shard.quant.int8_w8a8_matmul`), as llama.cpp's Q8_0 does per 32-value block; rows never mix, so
batched steps stay bit-identical to steps alone. Alternating the two paths:

1. one matmul at the 0.95B model's shapes (cold weights: eight copies cycled), ms and GB/s;
2. decode tokens/s after a 128-token prompt and prefill tokens/s of that prompt, whole model in one
   process (the random 0.95B Llama of bench_local.py), and how many greedy tokens the paths share;
3. relative output error on Gaussian inputs (tests/shard/test_quant.py's case), and on the bundled
   demo model (trained, so its tokens mean something) held-out perplexity (tools/eval_demo_model.py's
   windows) and the share of positions whose top-1 token equals fp32's, for each path.

    python benchmarks/bench_int8_paths.py [--threads 1] [--rounds 3] [--model DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_local import model_or_build  # noqa: E402
from shard import quant  # noqa: E402
from shard.generate import generate_local  # noqa: E402
from shard.pipeline import LocalPipeline  # noqa: E402
from shard.sampling import SamplingParams  # noqa: E402

SHAPES = [(2048, 3072), (2048, 2048), (2048, 11264), (5632, 2048)]  # fused qkv, o, fused gate/up, down
PATHS = ("weight-only", "int8 x int8")
HAS_OP = quant._has_aten_op


def use(path: str) -> None:
    """Hide `_int_mm` from shard.quant for the weight-only path (as on a torch without it)."""
    quant._has_aten_op = HAS_OP if path == PATHS[1] else (lambda name: name != quant._INT8_INT8_MM and HAS_OP(name))


def matmul_ms(path: str, k: int, n: int, repeats: int = 40) -> float:
    weights = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(8)]
    scales, x = torch.rand(n, dtype=torch.bfloat16) / 100, torch.randn(1, k)
    times = []
    for i in range(repeats):
        weight = weights[i % 8]
        started = time.perf_counter()
        if path == PATHS[0]:
            torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), weight, scales).float()
        else:
            quant.int8_w8a8_matmul(x, weight, scales)
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:]) * 1e3


def relative_error(path: str) -> float:
    torch.manual_seed(0)
    weight = torch.randn(256, 512) * 0.02
    x = torch.randn(16, 512, generator=torch.Generator().manual_seed(1))
    use(path)
    layer = quant.Int8Linear.from_float(weight)
    assert layer.uses_int8_activations() == (path == PATHS[1])
    got = layer(x)
    exact = x @ weight.T
    return float((got - exact).norm() / exact.norm())


def demo_quality(path: str) -> tuple[float, float]:
    """Held-out perplexity of the bundled demo model at int8 on this path (tools/eval_demo_model.py's
    windows of 512 every 256 tokens), and the share of positions whose top-1 token equals fp32's."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import eval_demo_model as demo

    model_dir = Path(__file__).resolve().parents[1] / "node" / "demo_model"
    use(path)
    int8, fp32 = LocalPipeline.load(model_dir, quant="int8"), LocalPipeline.load(model_dir)
    stream = demo.held_out_stream(model_dir)
    agree = total = 0

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        nonlocal agree, total
        logits = demo.pipeline_logits(int8, ids)
        agree += int((logits.argmax(-1) == demo.pipeline_logits(fp32, ids).argmax(-1)).sum())
        total += ids.shape[1]
        return logits

    scored = demo.score(path, logits_of, stream, 512, 256)
    return float(torch.tensor(scored.nll).exp()), agree / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model directory (default: build the random ~1B model)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}; matmul at M=1, cold weights (median of 38)")
    for k, n in SHAPES:
        row = [(path, min(matmul_ms(path, k, n) for _ in range(args.rounds))) for path in PATHS]
        print(f"  [{k} -> {n}]  " + "   ".join(f"{p}: {ms:.3f} ms ({k * n / ms / 1e6:.1f} GB/s)" for p, ms in row))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_or_build(args, tmp)
        pipeline = LocalPipeline.load(model_dir, quant="int8")
        prompt = torch.randint(3, 32000, (128,), generator=torch.Generator().manual_seed(1)).tolist()
        decode, prefill, tokens = {p: [] for p in PATHS}, {p: [] for p in PATHS}, {}
        for _ in range(args.rounds):  # alternating, so the shared machine's drift hits both alike
            for path in PATHS:
                use(path)
                out = generate_local(pipeline, prompt, SamplingParams(max_new_tokens=args.tokens))
                decode[path] += out.timings[1:]
                prefill[path].append(out.timings[0])
                tokens[path] = out.token_ids
    same = sum(a == b for a, b in zip(*tokens.values()))
    print(f"whole model ({model_dir.name if args.model else f'random h{args.hidden} L{args.layers}'}), "
          f"int8 blocks and LM head, batch 1")
    for path in PATHS:
        print(f"  {path:<15} decode {1 / statistics.median(decode[path]):6.2f} tok/s   "
              f"prefill of 128: {128 / statistics.median(prefill[path]):7.1f} tok/s")
    base, cand = (statistics.median(decode[p]) for p in PATHS)
    base_pre, cand_pre = (statistics.median(prefill[p]) for p in PATHS)
    print(f"  ratio: decode {base / cand:.2f}x, prefill {base_pre / cand_pre:.2f}x; greedy tokens shared: "
          f"{same} of {len(tokens[PATHS[0]])} (random weights: near-flat logits)")
    for path in PATHS:
        ppl, agree = demo_quality(path)
        print(f"  {path:<15} relative error on Gaussian inputs {relative_error(path):.4f}; demo model: held-out "
              f"perplexity {ppl:.3f} (fp32 41.950), top-1 token equal to fp32's at {100 * agree:.2f}% of positions")
    use(PATHS[1])


if __name__ == "__main__":
    main()
