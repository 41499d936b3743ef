"""Held-out perplexity of the demo model, run by Hearth's own code, unquantized and quantized.

The held-out text is the same as in training (every 50th stdlib file; tools/demo_corpus.py),
encoded with the model's own `tokenizer.json` into one stream, each file followed by
<|endoftext|>. The stream is cut into windows of `--window` tokens that start every `--stride`
tokens; each token is scored once, in the first window that reaches it, so after the first
window every token has at least `window - stride` tokens of context.

Each window runs through `LocalPipeline` the way a swarm runs it: the client head embeds, every
span runs over its own KV cache, and the head's final norm and LM head give logits at every
position (`LocalPipeline.forward` only returns the last one, so the spans are called here).

    .venv/bin/python tools/eval_demo_model.py                       # node/demo_model
    .venv/bin/python tools/eval_demo_model.py --transformers        # plus transformers' own fp32
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_corpus  # noqa: E402  (tools/ is not a package)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from shard.pipeline import LocalPipeline  # noqa: E402
from shard.tokenizer import Tokenizer  # noqa: E402


@dataclass(frozen=True)
class Variant:
    name: str
    quant: str  # blocks
    head_quant: str  # LM head (the embeddings stay fp32)


VARIANTS = (
    Variant("fp32", "none", "none"),
    Variant("int8", "int8", "none"),
    Variant("int4 g32", "int4", "none"),
    Variant("int8 + int8 head", "int8", "int8"),
    Variant("int4 g32 + int4 head", "int4", "int4"),
)


@dataclass(frozen=True)
class Score:
    variant: str
    tokens: int
    nll: float  # mean negative log-likelihood, nats per token
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def held_out_stream(model_dir: Path) -> torch.Tensor:
    """The held-out files, encoded with the model's tokenizer: [N] int64."""
    tokenizer = Tokenizer.from_dir(model_dir)
    _, held_out = demo_corpus.split_files(demo_corpus.corpus_files())
    ids: list[int] = []
    for file in held_out:
        ids.extend(tokenizer.encode(demo_corpus.document_text(file), add_special_tokens=False))
    return torch.tensor(ids, dtype=torch.int64)


def windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first): window ids[start:end], whose logits[first:-1] score targets start+first+1..end-1.

    Every target 1..length-1 is scored exactly once; needs stride < window.
    """
    spans, start, next_target = [], 0, 1
    while next_target < length:
        end = min(start + window, length)
        spans.append((start, end, next_target - start - 1))
        next_target, start = end, start + stride
    return spans


def pipeline_logits(pipeline: LocalPipeline, ids: torch.Tensor) -> torch.Tensor:
    # ids: [1, T] -> logits at every position [1, T, V]
    pipeline.start(batch=1, max_length=ids.shape[1])
    hidden = pipeline.head.embed(ids)  # [1, T, D]
    for span, cache in zip(pipeline.spans, pipeline.caches):
        hidden = span(hidden, cache)
    return pipeline.head.logits(hidden)


def score(name: str, logits_of, stream: torch.Tensor, window: int, stride: int) -> Score:
    """Mean NLL of every token of `stream` but the first, `logits_of(ids [1, T]) -> [1, T, V]`."""
    started, total, count = time.perf_counter(), 0.0, 0
    for start, end, first in windows(len(stream), window, stride):
        ids = stream[start:end]
        logits = logits_of(ids[None])[0]  # [T, V]
        losses = F.cross_entropy(logits[first:-1].float(), ids[first + 1 :], reduction="sum")
        total, count = total + float(losses), count + (end - start - 1 - first)
    return Score(name, count, total / count, time.perf_counter() - started)


def transformers_logits(model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.inference_mode()
    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids).logits

    return logits_of


def report(scores: list[Score]) -> str:
    base = scores[0]
    lines = [f"{'variant':24s} {'tokens':>7s} {'nll':>7s} {'ppl':>8s} {'vs fp32':>8s} {'seconds':>8s}"]
    for s in scores:
        change = (s.perplexity / base.perplexity - 1) * 100
        lines.append(f"{s.variant:24s} {s.tokens:7d} {s.nll:7.4f} {s.perplexity:8.3f} {change:+7.2f}% {s.seconds:8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "node" / "demo_model", metavar="DIR")
    parser.add_argument("--window", type=int, default=512, help="tokens per window (<= max_position_embeddings)")
    parser.add_argument("--stride", type=int, default=256, help="tokens between window starts")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--transformers", action="store_true", help="also score with transformers' LlamaForCausalLM")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the scores as JSON here")
    args = parser.parse_args(argv)
    if not 0 < args.stride < args.window:
        raise SystemExit(f"--stride must be in 1..{args.window - 1} (below --window), got {args.stride}")
    torch.set_num_threads(args.threads)
    stream = held_out_stream(args.model)
    print(f"held-out stream: {len(stream):,} tokens (Python {demo_corpus.python_version()} stdlib), "
          f"windows of {args.window} every {args.stride}", flush=True)
    scores = []
    for variant in VARIANTS:
        pipeline = LocalPipeline.load(args.model, quant=variant.quant, head_quant=variant.head_quant, group_size=32)
        scores.append(score(variant.name, lambda ids: pipeline_logits(pipeline, ids), stream, args.window, args.stride))
        print(f"  {variant.name}: ppl {scores[-1].perplexity:.3f} ({scores[-1].seconds:.0f} s)", flush=True)
    if args.transformers:
        scores.append(score("transformers fp32", transformers_logits(args.model), stream, args.window, args.stride))
    print(report(scores))
    if args.json:
        args.json.write_text(json.dumps([asdict(s) | {"perplexity": s.perplexity} for s in scores], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
