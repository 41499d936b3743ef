"""Simulator speed: virtual seconds per wall second, and how it scales with the swarm.

Issue 8's target is 1,000 nodes and 100 concurrent clients for 2 hours of virtual time in under 10
minutes of wall time. This runs a scenario (default `steady`) at --nodes / --clients for
--duration, and the same at a tenth of the nodes and clients as the baseline measured in the same
run, then prints both ratios of virtual to wall time, the per-session wall cost, and the wall time
projected for 2 hours at the large scale.

    python benchmarks/bench_simulator.py [--nodes 1000] [--clients 100] [--duration 5m] [--scenario steady]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulations.report import session_summary  # noqa: E402
from simulations.runner import run_scenario  # noqa: E402
from simulations.scenario import load_scenario, parse_duration  # noqa: E402

TARGET_WALL_S = 600.0
TARGET_VIRTUAL_S = 7200.0


def measure(name: str, nodes: int, clients: int, duration_s: float, seed: int) -> dict:
    scenario = load_scenario(name).scaled(nodes=nodes, clients=clients, duration_s=duration_s, seed=seed)
    result = run_scenario(scenario, progress=True)
    sessions = session_summary(result.sessions)
    return {"nodes": nodes, "clients": clients, "virtual_s": result.virtual_s, "wall_s": result.wall_s,
            "ratio": result.virtual_s / result.wall_s, "sessions": sessions["started"],
            "wall_per_session_s": result.wall_s / max(1, sessions["started"]), "ok": result.ok,
            "hash": result.trace_hash}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="steady")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--duration", default="5m")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    duration = parse_duration(args.duration)
    base = measure(args.scenario, max(1, args.nodes // 10), max(1, args.clients // 10), duration, args.seed)
    large = measure(args.scenario, args.nodes, args.clients, duration, args.seed)
    print("| nodes | clients | virtual | wall | virtual/wall | sessions | wall per session | invariants | trace |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in (base, large):
        print(f"| {row['nodes']} | {row['clients']} | {row['virtual_s']:.0f} s | {row['wall_s']:.1f} s | "
              f"{row['ratio']:.1f}x | {row['sessions']} | {row['wall_per_session_s']:.2f} s | "
              f"{'hold' if row['ok'] else 'VIOLATED'} | `{row['hash']}` |")
    projected = TARGET_VIRTUAL_S / large["ratio"]
    verdict = "meets" if projected <= TARGET_WALL_S else "MISSES"
    print(f"scaling nodes and clients x{args.nodes / base['nodes']:.0f} divides virtual/wall by "
          f"{base['ratio'] / large['ratio']:.1f}; 2 h at {args.nodes} nodes / {args.clients} clients projects to "
          f"{projected / 60:.0f} min of wall time ({verdict} the 10 min target)")


if __name__ == "__main__":
    main()
