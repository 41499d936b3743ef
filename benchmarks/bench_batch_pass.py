"""A node's batched pass: several sessions' decode steps through one span, compiled vs the modules.

A node runs the decode steps that arrive together as one pass (`shard.batch.forward_batch`). Up to
`shard.block_step.MAX_ROWS` rows, the pass runs in one compiled call (`shard.block_step.run`);
else, and with `--arms` naming "modules", torch modules run it block by block (what every pass did
before). This loads one span of the model (int8, or int4 at --group-size), opens --sessions
sessions each after a --prompt-token prompt, and times decode passes of all of them, alternating
the two arms pass by pass so the shared machine's drift hits both alike (the arms' outputs are
checked to be bit-identical). It also times one session's step alone, the cost one row pays.

Prints the median ms per pass of each arm, their ratio, and the aggregate tokens/s.

    python benchmarks/bench_batch_pass.py --model DIR [--quant int8|int4] [--group-size 64]
        [--sessions 4] [--blocks 0:8] [--threads 1] [--passes 48]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shard.batch import BatchItem, forward_batch  # noqa: E402
from shard.span import SpanModel, load_span  # noqa: E402

WARM_PASSES = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a Llama-family model directory or GGUF file")
    parser.add_argument("--quant", choices=["int8", "int4"], default="int8")
    parser.add_argument("--group-size", type=int, default=64, help="int4 group (default 64: Q4_0's bits)")
    parser.add_argument("--sessions", type=int, default=4, help="decoding sessions in each pass (<= 8 to compile)")
    parser.add_argument("--blocks", default="0:8", help="the span, START:END")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--passes", type=int, default=48, help="timed passes per arm")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start, end = (int(part) for part in args.blocks.split(":"))
    span = load_span(args.model, start, end, quant=args.quant, group_size=args.group_size)
    width = span.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    max_length = args.prompt_tokens + WARM_PASSES + args.passes + 8
    arms = {"compiled": span, "modules": _modules_only(span)}
    caches = {arm: [span.new_cache(1, max_length) for _ in range(args.sessions)] for arm in arms}
    with torch.inference_mode():
        for session in range(args.sessions):
            prompt = torch.randn(1, args.prompt_tokens, width, generator=generator)
            for arm, model in arms.items():
                model(prompt, caches[arm][session])
        alone_cache = span.new_cache(1, max_length)
        span(torch.randn(1, args.prompt_tokens, width, generator=generator), alone_cache)
        times: dict[str, list[float]] = {arm: [] for arm in (*arms, "one session alone")}
        for index in range(WARM_PASSES + args.passes):
            hidden = [torch.randn(1, 1, width, generator=generator) for _ in range(args.sessions)]
            outputs = {}
            for arm, model in arms.items():
                items = [BatchItem(h, cache, start, end) for h, cache in zip(hidden, caches[arm])]
                began = time.perf_counter()
                outputs[arm] = forward_batch(model, items)
                if index >= WARM_PASSES:
                    times[arm].append(time.perf_counter() - began)
            if not all(torch.equal(a, b) for a, b in zip(outputs["compiled"], outputs["modules"])):
                raise SystemExit("the arms' outputs differ: the compiled pass does not give the modules' bits")
            began = time.perf_counter()
            span(hidden[0], alone_cache)
            if index >= WARM_PASSES:
                times["one session alone"].append(time.perf_counter() - began)
    medians = {arm: statistics.median(values) for arm, values in times.items()}
    label = args.quant if args.quant == "int8" else f"int4 g{args.group_size}"
    print(f"{label}, blocks [{start}, {end}), {args.threads} thread(s), {args.sessions} sessions a pass "
          f"after {args.prompt_tokens}-token prompts, {args.passes} passes per arm (outputs bit-identical):")
    for arm, median in medians.items():
        rows = 1 if arm == "one session alone" else args.sessions
        print(f"  {arm:18s} {median * 1e3:7.2f} ms a pass, {rows / median:6.1f} tokens/s")
    print(f"compiled pass: {medians['modules'] / medians['compiled']:.2f}x the speed of the modules' pass; "
          f"{medians['compiled'] / medians['one session alone']:.2f}x the time of one session's step "
          f"for {args.sessions}x its tokens")


def _modules_only(span: SpanModel) -> SpanModel:
    """The same blocks (shared weights), with the compiled step switched off."""
    view = span.sub_span(span.start, span.end)
    view.compiled_blocks = lambda rows, caches: None
    return view


if __name__ == "__main__":
    main()
