"""Fuzz the wire protocol with many random and mutated frames and report what happened.

    .venv/bin/python benchmarks/fuzz_protocol.py                 # 1,000,000 frames, seed 0
    .venv/bin/python benchmarks/fuzz_protocol.py --frames 50000 --seed 3
    .venv/bin/python benchmarks/fuzz_protocol.py --write-results  # also update RESULTS.md

Each frame (see `protocol.fuzzing.fuzz_frames`) goes to a fresh `FrameDecoder` in random splits
and every tensor that comes out is decoded. The only acceptable outcomes are messages, "partial"
(waiting for more bytes) or a `ProtocolError`; anything else is a bug, printed with the frame,
and makes the script exit 1. Also reported: frames per second, the slowest frame, peak RSS.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import random
import resource
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.results import write_section  # noqa: E402
from protocol.codecs import ZstdContext  # noqa: E402
from protocol.fuzzing import FUZZ_MAX_FRAME_BYTES, FUZZ_TENSOR_LIMITS, check_frame, fuzz_frames  # noqa: E402

SECTION = "## Protocol fuzzing"


def run(frames: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    zstd = ZstdContext()
    outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
    bugs: list[str] = []
    slowest = (0.0, "")
    started = time.perf_counter()
    for index, (kind, frame) in enumerate(fuzz_frames(rng, frames)):
        begun = time.perf_counter()
        try:
            outcome = check_frame(frame, rng, zstd)
        except Exception:  # noqa: BLE001  (the point: anything but ProtocolError is a bug)
            outcome = "BUG"
            if len(bugs) < 5:
                bugs.append(f"frame {index} ({kind}) {frame[:64]!r}...\n{traceback.format_exc()}")
        elapsed = time.perf_counter() - begun
        slowest = max(slowest, (elapsed, kind))
        outcomes[(kind, outcome)] += 1
        if index and index % 100_000 == 0:
            rate = index / (time.perf_counter() - started)
            print(f"  {index:,} frames, {rate:,.0f}/s", file=sys.stderr)
    seconds = time.perf_counter() - started
    return {"frames": frames, "seed": seed, "seconds": seconds, "outcomes": outcomes,
            "bugs": bugs, "slowest": slowest}


def report(result: dict[str, object], command: str) -> str:
    outcomes: collections.Counter[tuple[str, str]] = result["outcomes"]  # type: ignore[assignment]
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for (kind, outcome), count in outcomes.items():
        by_kind[kind][outcome] += count
    bug_count = sum(count for (_, outcome), count in outcomes.items() if outcome == "BUG")
    slowest_s, slowest_kind = result["slowest"]  # type: ignore[misc]
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [
        SECTION, "", f"Command: `{command}`", "",
        f"- {result['frames']:,} frames (seed {result['seed']}) in {result['seconds']:.1f} s: "
        f"{result['frames'] / result['seconds']:,.0f} frames/s on this 2-core VM.",
        f"- Exceptions other than `ProtocolError`: **{bug_count}**. Slowest frame: "
        f"{slowest_s * 1e3:.1f} ms ({slowest_kind}). Peak RSS of the process: {rss_mib:.0f} MiB.",
        f"- Limits: frames {FUZZ_MAX_FRAME_BYTES >> 10} KiB, tensors "
        f"{FUZZ_TENSOR_LIMITS.max_elements:,} elements.",
        "", "| kind | frames | outcomes |", "|---|---|---|",
    ]
    for kind in sorted(by_kind):
        counts = by_kind[kind]
        detail = ", ".join(f"{name} {count:,}" for name, count in counts.most_common())
        lines.append(f"| {kind} | {sum(counts.values()):,} | {detail} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    result = run(args.frames, args.seed)
    command = "python benchmarks/fuzz_protocol.py " + " ".join(sys.argv[1:])
    text = report(result, command.strip())
    print(text)
    for bug in result["bugs"]:  # type: ignore[attr-defined]
        print(bug, file=sys.stderr)
    if args.write_results:
        write_section(text)
    return 1 if result["bugs"] else 0


if __name__ == "__main__":
    sys.exit(main())
