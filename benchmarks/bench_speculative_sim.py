"""Speculative decoding in the simulator: decode tokens/s with and without drafts, on 5 ms and 30 ms links.

Runs `simulations/scenarios/speculative-5ms.toml` and `speculative-30ms.toml` (a small steady
swarm, greedy answers of 96-128 tokens, drafts right with probability 0.8 each) twice with one
seed: clients speculating and not. Decode tokens/s is measured the same way for both runs: tokens
after the first over decode time, summed over completed sessions (`simulations.report.decode_summary`).
`ratio` compares all completed sessions of each run (speculation completes more in the same
virtual time); `same sessions` only those both runs completed (each user's n-th request: the same
prompt), `per session p50` the medians of sessions' own rates. The target: at least 2.5x on 30 ms
links at acceptance 0.8.

    python benchmarks/bench_speculative_sim.py [--seed N] [--acceptance 0.8]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulations.report import speculation_gain  # noqa: E402
from simulations.runner import run_scenario  # noqa: E402
from simulations.scenario import load_scenario  # noqa: E402

LINKS = ("5ms", "30ms")
TARGET_RATIO_30MS = 2.5


def simulated(link: str, *, seed: int | None = None, acceptance: float | None = None) -> dict:
    """Scenario `speculative-{link}` with speculation off and on (same seed): decode tokens/s of each,
    their ratio, the drafts' acceptance, decode passes per decoded token, and whether the sessions
    both runs completed gave the same tokens."""
    if link not in LINKS:
        raise ValueError(f"link must be one of {', '.join(LINKS)}, got {link!r}")
    scenario = load_scenario(f"speculative-{link}").scaled(seed=seed)
    if acceptance is not None:
        scenario = dataclasses.replace(scenario, clients=dataclasses.replace(scenario.clients,
                                                                             draft_acceptance=acceptance))
    on, off = run_scenario(scenario.scaled(speculative=True)), run_scenario(scenario.scaled(speculative=False))
    gain = speculation_gain(on, off)
    drafts = gain["on"]["speculation"]
    return {"link": link, "off_tokens_per_s": gain["off"]["tokens_per_s"], "on_tokens_per_s": gain["on"]["tokens_per_s"],
            "ratio": gain["ratio"], "ratio_paired": gain["ratio_paired"], "ratio_per_session_p50": gain["ratio_per_session_p50"],
            "acceptance": drafts["acceptance"], "passes_per_token": drafts["passes_per_token"],
            "drafts_per_pass": round(drafts["drafted"] / drafts["passes"], 3) if drafts["passes"] else None,
            "identical_tokens": gain["identical_tokens"], "compared_sessions": gain["compared_sessions"],
            "sessions": (gain["off"]["sessions"], gain["on"]["sessions"]), "invariants": on.ok and off.ok,
            "wall_s": round(on.wall_s + off.wall_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, help="overrides the scenarios' seed")
    parser.add_argument("--acceptance", type=float, help="overrides [clients] draft_acceptance")
    args = parser.parse_args()
    rows = [simulated(link, seed=args.seed, acceptance=args.acceptance) for link in LINKS]
    print("| link RTT | off tok/s | on tok/s | ratio | same sessions | per session p50 | acceptance | passes per token | "
          "drafts per pass | sessions off / on | same tokens | invariants | wall |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['link']} | {r['off_tokens_per_s']:.2f} | {r['on_tokens_per_s']:.2f} | {r['ratio']:.2f}x | "
              f"{r['ratio_paired']:.2f}x | {r['ratio_per_session_p50']:.2f}x | {r['acceptance']:.2f} | {r['passes_per_token']:.3f} | "
              f"{r['drafts_per_pass']:.2f} | {r['sessions'][0]} / {r['sessions'][1]} | "
              f"{'yes' if r['identical_tokens'] else 'NO'} ({r['compared_sessions']}) | "
              f"{'hold' if r['invariants'] else 'VIOLATED'} | {r['wall_s']:.0f} s |")
    ratio = next(r["ratio"] for r in rows if r["link"] == "30ms")
    verdict = "meets" if ratio >= TARGET_RATIO_30MS else "MISSES"
    print(f"30 ms links: {ratio:.2f}x decode tokens/s with speculation ({verdict} the {TARGET_RATIO_30MS:g}x target)")


if __name__ == "__main__":
    main()
