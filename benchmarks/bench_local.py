"""Decode speed of one process on this machine: transformers fp32 (the baseline) vs our spans.

Builds a random Llama-architecture model of about 1B parameters (hidden 2048, 16 layers, vocab
32000), saves it once, then measures in one run decode tokens/s at batch 1 after a 128-token
prefill for: transformers fp32, ours fp32, bf16, int8 and int4 (g32), and the memory-bandwidth
bound of each (weight bytes read per token / measured read bandwidth). Prints ratios against the
transformers baseline measured in the same run.

    python benchmarks/bench_local.py [--layers 16] [--hidden 2048] [--steps 24] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shard.pipeline import LocalPipeline  # noqa: E402

CONTEXT = 128


def read_bandwidth(size_bytes: int = 512 * 2**20, repeats: int = 5) -> tuple[float, float]:
    """Bytes per second (best of `repeats`): read by a large tensor sum, and moved by a copy (read + write)."""
    src = torch.ones(size_bytes // 4)
    dst = torch.empty_like(src)
    best_sum = best_copy = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        src.sum()
        best_sum = min(best_sum, time.perf_counter() - start)
        start = time.perf_counter()
        dst.copy_(src)
        best_copy = min(best_copy, time.perf_counter() - start)
    return size_bytes / best_sum, 2 * size_bytes / best_copy


def save_model(path: Path, args) -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64, max_position_embeddings=2048,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
    model.save_pretrained(path)


def model_or_build(args, tmp: str) -> Path:
    """`args.model` if given, else the random Llama of `args.hidden` x `args.layers` saved under `tmp`."""
    if args.model is not None:
        return args.model
    model_dir = Path(tmp) / "model"
    print(f"building random Llama h{args.hidden} L{args.layers} ...", flush=True)
    save_model(model_dir, args)
    return model_dir


def time_decode(step, steps: int) -> float:
    """Median seconds per decode step; `step()` runs one step."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])  # the first steps warm caches


def bench_transformers(model_dir: Path, steps: int) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 32000, (1, CONTEXT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        state = {"past": out.past_key_values, "next": out.logits[:, -1:].argmax(-1)}

        def step():
            out = model(input_ids=state["next"], past_key_values=state["past"], use_cache=True)
            state["past"], state["next"] = out.past_key_values, out.logits[:, -1:].argmax(-1)

        seconds = time_decode(step, steps)
    del model, state
    gc.collect()
    return seconds


def bench_ours(model_dir: Path, steps: int, quant: str, dtype: torch.dtype) -> tuple[float, int]:
    pipeline = LocalPipeline.load(model_dir, quant=quant, dtype=dtype, head_quant=quant)
    # bytes read per decoded token: every block and the LM head; of the embedding table, one row
    tensors = [t for span in pipeline.spans for t in span.state_dict().values()]
    tensors += [t for name, t in pipeline.head.state_dict().items() if name != "embed_weight"]
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    ids = torch.randint(0, 32000, (1, CONTEXT), generator=torch.Generator().manual_seed(1))
    pipeline.start(batch=1, max_length=CONTEXT + steps + 1)
    state = {"next": pipeline.forward(ids).argmax(-1, keepdim=True)}

    def step():
        state["next"] = pipeline.forward(state["next"]).argmax(-1, keepdim=True)

    seconds = time_decode(step, steps)
    del pipeline, state
    gc.collect()
    return seconds, weight_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (1 keeps the figures sane when another process holds a core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = [("ours fp32", "none", torch.float32), ("ours bf16", "none", torch.bfloat16),
                ("ours int8", "int8", torch.float32), ("ours int4 g32", "int4", torch.float32)]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        print(f"building random Llama h{args.hidden} L{args.layers} v32000 ...", flush=True)
        save_model(model_dir, args)
        bandwidth = read_bandwidth()
        results: dict[str, list[float]] = {"transformers fp32": []}
        weights: dict[str, int] = {}
        for round_ in range(args.repeats):
            results["transformers fp32"].append(bench_transformers(model_dir, args.steps))
            for name, quant, dtype in variants:
                seconds, weights[name] = bench_ours(model_dir, args.steps, quant, dtype)
                results.setdefault(name, []).append(seconds)
            print(f"round {round_ + 1}/{args.repeats} done", flush=True)
    report(results, weights, bandwidth, args)


def report(results: dict[str, list[float]], weights: dict[str, int], bandwidth: tuple[float, float], args) -> None:
    base = statistics.median(results["transformers fp32"])
    read, copy = bandwidth
    print(f"\nread bandwidth {read / 1e9:.1f} GB/s (sum), copy {copy / 1e9:.1f} GB/s (read+write); "
          f"load average {os.getloadavg()[0]:.2f}; threads {torch.get_num_threads()}; "
          f"batch 1, context {CONTEXT}, {args.steps} steps x {args.repeats} rounds (median)")
    print(f"{'variant':<20}{'ms/token':>10}{'tok/s':>9}{'vs tf fp32':>12}{'weights GB':>12}{'bound tok/s':>13}")
    for name, samples in results.items():
        seconds = statistics.median(samples)
        size = weights.get(name, weights.get("ours fp32", 0))
        bound = read / size if size else float("nan")  # every weight is read once per token
        print(f"{name:<20}{seconds * 1e3:>10.1f}{1 / seconds:>9.2f}{base / seconds:>11.2f}x"
              f"{size / 1e9:>12.2f}{bound:>13.1f}")


if __name__ == "__main__":
    main()
