"""`python -m simulations run SCENARIO.toml [--seed N] [--nodes N] [--clients N] [--duration 2h] [--out DIR]`

Runs the scenario (a path, or the name of one in `simulations/scenarios/`), writes `report.json`,
`sessions.json` and PNG plots to `--out`, prints a summary table, and exits 1 naming the seed to
replay if an invariant was violated (2 for a bad scenario or argument). `--hostile F` sets the
share of hostile hosts and `--verify-rate R` the clients' spot-check rate; `--baseline` also runs
the same scenario and seed without hostile hosts and, when clients check, without hostile hosts
and without checks, and reports all (the last two: what checking costs an honest swarm).
`--speculative` / `--no-speculative` turn the clients' speculative decoding on or off (the
scenario's [clients] speculative); with it on, `--baseline` also runs the same scenario and seed
without it and compares decode tokens/s. `sweep SCENARIO --seeds N` runs seeds 0..N-1 and names every seed that violated an
invariant; `list` names the built-in scenarios.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from simulations.scenario import SCENARIO_DIR, ScenarioError, load_scenario, parse_duration


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations", description="Hearth's network simulator")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a scenario")
    run.add_argument("scenario", help="a scenario TOML file, or a built-in name (see `list`)")
    run.add_argument("--seed", type=int, help="overrides the scenario's seed")
    run.add_argument("--nodes", type=int, help="household nodes online on average")
    run.add_argument("--clients", type=int, help="users")
    run.add_argument("--duration", help="virtual time, e.g. 30m or 2h")
    run.add_argument("--spans", choices=("weakest", "balanced", "random"),
                     help="overrides how household hosts choose spans (the scenario's [balance] spans)")
    run.add_argument("--hostile", type=float, metavar="FRACTION",
                     help="overrides the share of hostile hosts (the scenario's [hostile] fraction; 0: none)")
    run.add_argument("--verify-rate", type=float, metavar="R",
                     help="overrides the clients' spot-check rate (the scenario's [clients] verify_rate; 0: off)")
    run.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=None,
                     help="overrides whether clients decode speculatively (the scenario's [clients] speculative)")
    run.add_argument("--baseline", action="store_true",
                     help="also run the same scenario and seed without hostile hosts (and, when clients check, "
                          "without checks either; when they speculate, without speculation), and compare")
    run.add_argument("--out", type=Path, help="where report.json and the plots go (default sim-out/NAME-seedN)")
    run.add_argument("--checkpoint", type=Path, help="model directory for compute = 'torch' scenarios")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    run.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    run.add_argument("--trace", action="store_true", help="also write every trace line to trace.txt")
    run.add_argument("--log-level", default="ERROR", help="the node's and client's logs on stderr (e.g. INFO)")
    sweep = commands.add_parser("sweep", help="run one scenario for many seeds; check the invariants of each")
    sweep.add_argument("scenario")
    sweep.add_argument("--seeds", type=int, default=50, help="seeds 0 .. N-1")
    sweep.add_argument("--nodes", type=int)
    sweep.add_argument("--clients", type=int)
    sweep.add_argument("--duration")
    sweep.add_argument("--hostile", type=float, metavar="FRACTION")
    sweep.add_argument("--verify-rate", type=float, metavar="R")
    sweep.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=None)
    commands.add_parser("list", help="name the built-in scenarios")
    return parser


def sweep(args: argparse.Namespace) -> int:
    """One line per seed; exits 1 naming every seed whose run violated an invariant."""
    import time

    from simulations.report import replay_command, session_summary
    from simulations.runner import run_scenario

    duration = parse_duration(args.duration, "--duration") if args.duration else None
    base = load_scenario(args.scenario).scaled(nodes=args.nodes, clients=args.clients, duration_s=duration,
                                               hostile=args.hostile, verify_rate=args.verify_rate,
                                               speculative=args.speculative)
    started, failed = time.perf_counter(), []
    for seed in range(args.seeds):
        result = run_scenario(base.scaled(seed=seed))
        counts = session_summary(result.sessions)
        print(f"seed {seed:3d} {result.trace_hash} sessions {counts['started']:4d} completed {counts['completed']:4d} "
              f"failed {counts['failed_with_error']:3d} hung {counts['hung']} "
              f"{'ok' if result.ok else 'VIOLATED: ' + result.violations[0]} ({result.wall_s:.1f} s)", flush=True)
        if not result.ok:
            failed.append(replay_command(result, args.scenario, speculative_flag=args.speculative is not None))
    print(f"{args.seeds} seeds in {time.perf_counter() - started:.1f} s wall; "
          f"{len(failed)} violated the invariants" + "".join(f"\n  replay: {c}" for c in failed))
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    from simulations.plots import write_plots
    from simulations.report import (
        baseline_summary, build_report, checks_cost, speculation_gain, summary, write_report,
    )
    from simulations.runner import run_scenario

    duration = parse_duration(args.duration, "--duration") if args.duration else None
    scenario = load_scenario(args.scenario).scaled(nodes=args.nodes, clients=args.clients, duration_s=duration,
                                                   seed=args.seed, spans=args.spans, hostile=args.hostile,
                                                   verify_rate=args.verify_rate, speculative=args.speculative)
    level = getattr(logging, args.log_level.upper(), None)
    if not isinstance(level, int):
        raise ScenarioError("--log-level", f"{args.log_level!r} is not a logging level")
    logging.basicConfig(format="%(relativeCreated)8.0f %(name)s %(levelname)s %(message)s")
    result = run_scenario(scenario, checkpoint=args.checkpoint, progress=not args.no_progress,
                          keep_trace=args.trace, log_level=level)
    out = args.out or Path("sim-out") / f"{scenario.name}-seed{scenario.seed}"
    report = build_report(result, scenario_arg=args.scenario)
    ok = result.ok
    if args.baseline and scenario.clients.speculative:
        off = run_scenario(scenario.scaled(speculative=False), checkpoint=args.checkpoint,
                           progress=not args.no_progress, log_level=level)
        report["without_speculation"] = speculation_gain(result, off, scenario_arg=args.scenario)
        ok = ok and off.ok
    if args.baseline and (scenario.hostile.fraction > 0 or not scenario.clients.speculative):
        base = run_scenario(scenario.scaled(hostile=0.0), checkpoint=args.checkpoint, progress=not args.no_progress,
                            log_level=level)
        report["baseline"] = baseline_summary(base, report, scenario_arg=args.scenario)
        ok = ok and base.ok
        if scenario.clients.verify_rate > 0:
            unchecked = run_scenario(scenario.scaled(hostile=0.0, verify_rate=0.0), checkpoint=args.checkpoint,
                                     progress=not args.no_progress, log_level=level)
            report["baseline"]["without_checks"] = checks_cost(base, unchecked, scenario_arg=args.scenario)
            ok = ok and unchecked.ok
    written = write_report(report, result, out)
    if not args.no_plots:
        written += write_plots(result, out)
    print(summary(report))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "list":
        for path in sorted(SCENARIO_DIR.glob("*.toml")):
            scenario = load_scenario(path)
            print(f"{path.stem:20s} {scenario.description}")
        return 0
    try:
        return sweep(args) if args.command == "sweep" else run(args)
    except ScenarioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
