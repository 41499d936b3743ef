"""Decode speed with quantized weights on 2 MiB pages against 4 KiB pages, same model, same run.

Loads the model twice in this process: once with `shard.huge_pages` switched off (the weights
where torch allocated them, on 4 KiB pages), once on (copied into memory advised for transparent
huge pages). Then it alternates the two round by round: a 128-token prompt, then decode steps at
batch 1, timed one by one. It prints the median ms per token of each and their ratio, and the
AnonHugePages the process holds. Needs THP in "always" or "madvise" mode
(/sys/kernel/mm/transparent_hugepage/enabled); elsewhere both arms are the same.

    python benchmarks/bench_huge_pages.py --model DIR [--quant int8|int4] [--group-size 64]
        [--threads 1] [--rounds 4] [--tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shard import huge_pages  # noqa: E402
from shard.pipeline import LocalPipeline  # noqa: E402

PROMPT_TOKENS = 128


def anon_huge_mib() -> float:
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a Llama-family model directory or GGUF file")
    parser.add_argument("--quant", choices=["int8", "int4"], default="int8")
    parser.add_argument("--group-size", type=int, default=64, help="int4 group (default 64: Q4_0's bits)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"transparent huge pages: {'available' if huge_pages.supported() else 'off (both arms alike)'}")
    pipelines = {}
    for huge in (False, True):
        huge_pages._SUPPORTED = huge and huge_pages.supported()
        pipeline = LocalPipeline.load(args.model, quant=args.quant, head_quant=args.quant, group_size=args.group_size)
        pipeline.start(1, 8)
        with torch.inference_mode():
            pipeline.forward(torch.tensor([[1]]))  # builds the kernels' views (and, when on, the copies)
        pipelines[huge] = pipeline
    print(f"AnonHugePages held: {anon_huge_mib():.0f} MiB")
    steps: dict[bool, list[float]] = {False: [], True: []}
    prompt = list(range(100, 100 + PROMPT_TOKENS))
    with torch.inference_mode():
        for round_ in range(args.rounds):
            for huge, pipeline in pipelines.items():
                pipeline.start(1, PROMPT_TOKENS + args.tokens + 8)
                pipeline.forward(torch.tensor([prompt]))
                for i in range(args.tokens):
                    started = time.perf_counter()
                    pipeline.forward(torch.tensor([[prompt[i]]]))
                    steps[huge].append(time.perf_counter() - started)
            print(f"round {round_ + 1}: " + ", ".join(
                f"{'2 MiB' if huge else '4 KiB'} pages {statistics.median(times) * 1e3:.2f} ms/token"
                for huge, times in steps.items()), flush=True)
    small, large = statistics.median(steps[False]), statistics.median(steps[True])
    label = args.quant if args.quant == "int8" else f"int4 g{args.group_size}"
    print(f"{label}, {args.threads} thread(s), batch 1 after a {PROMPT_TOKENS}-token prompt: 4 KiB pages "
          f"{small * 1e3:.2f} ms/token, 2 MiB pages {large * 1e3:.2f} ms/token: {small / large:.2f}x the speed")


if __name__ == "__main__":
    main()
