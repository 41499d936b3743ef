"""Span balancing in the simulator: the same population with random static spans and with balancing.

Runs a scenario (default `balance`: 100 mixed household hosts joining one by one on an 80-block
model, 30% of them leaving at once halfway) for each seed three times: `spans = "random"` (each
host a random window of what its memory holds, never moving), `"weakest"` (the window where the
swarm is weakest when it joins, `mesh.balance`, never moving) and `"balanced"` (that, then
rebalancing, `node.rebalance`), and prints them side by side: when joins covered the model once and twice over against when memory allowed it,
the moves, how long full coverage took to come back after the departure, sessions, and the swarm's
throughput (tokens/s summed over clients). Target: balanced >= 1.5x random on every seed.

    python benchmarks/bench_balance.py [--scenario balance] [--seeds 1 2 3] [--duration 20m] [--memory-scale 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulations.report import build_report  # noqa: E402
from simulations.runner import run_scenario  # noqa: E402
from simulations.scenario import load_scenario, parse_duration  # noqa: E402

POLICIES = ("random", "weakest", "balanced")


def row(seed: int, report: dict) -> str:
    b, s, j = report["balance"], report["sessions"], report["balance"]["joins"]
    restored = ", ".join("no" if not r["restored"] else f"{r['after_s']:g} s" for r in b["restorations"]) or "-"
    return (f"| {seed} | {b['spans']} | {j['1x']['memory_allows_at']} / {j['1x']['covered_at']} | "
            f"{j['2x']['memory_allows_at']} / {j['2x']['covered_at']} | {j['min_replicas_after']} | {b['moves']} | "
            f"{restored} | {s['started']} | {s['completed']} | {s['failed_with_error']} | {s['hung']} | "
            f"{b['swarm_tokens_per_s']:.2f} | {report['wall_s']:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="balance")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--duration", help="virtual time per run (default: the scenario's)")
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--clients", type=int)
    parser.add_argument("--memory-scale", type=float, default=1.0,
                        help="multiply every device's memory for weights (a roomier population)")
    args = parser.parse_args()
    duration = parse_duration(args.duration, "--duration") if args.duration else None
    base = load_scenario(args.scenario).scaled(nodes=args.nodes, clients=args.clients, duration_s=duration)
    if args.memory_scale != 1.0:
        devices = {name: dataclasses.replace(d, weights_gb=d.weights_gb * args.memory_scale)
                   for name, d in base.devices.items()}
        base = dataclasses.replace(base, devices=devices)
    print("| seed | spans | 1x coverage: memory allows / covered at join | 2x: allows / covered | min replicas "
          "after joins | moves | full coverage back after the departure | sessions | completed | failed | hung | "
          "swarm tok/s | wall |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    totals = {policy: 0.0 for policy in POLICIES}
    ratios = []
    for seed in args.seeds:
        rates = {}
        for policy in POLICIES:
            result = run_scenario(base.scaled(seed=seed, spans=policy))
            report = build_report(result, scenario_arg=args.scenario)
            rates[policy] = report["balance"]["swarm_tokens_per_s"]
            totals[policy] += rates[policy]
            print(row(seed, report), flush=True)
            if not result.ok:
                print(f"  INVARIANTS VIOLATED: {result.violations[:3]}", flush=True)
        ratios.append({base: rates["balanced"] / rates[base] if rates[base] > 0 else float("inf")
                       for base in ("random", "weakest")})
    print()
    for base in ("random", "weakest"):
        shown = ", ".join("inf (blocks left uncovered)" if r[base] == float("inf") else f"{r[base]:.2f}x"
                          for r in ratios)
        print(f"swarm throughput, balanced / {base}, per seed: {shown}; summed over seeds: "
              f"{totals['balanced']:.2f} / {totals[base]:.2f} tok/s")
    print("target: balanced >= 1.5x random on every seed")


if __name__ == "__main__":
    main()
