"""`python -m simulations`: every built-in scenario at small scale, report.json, plots, exit codes."""

from __future__ import annotations

import json

import pytest

from simulations.__main__ import main
from simulations.scenario import SCENARIO_DIR

SCENARIOS = sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))
REPORT_KEYS = {"sessions", "tokens_per_s_per_client", "recovery", "coverage", "trace_hash", "invariants"}


@pytest.mark.parametrize("name", SCENARIOS)
def test_each_scenario_runs_small_from_the_command_line(name, tmp_path, capsys):
    plots = [] if name == "datacenter-outage" else ["--no-plots"]
    code = main(["run", str(SCENARIO_DIR / f"{name}.toml"), "--seed", "3", "--nodes", "20", "--clients", "2",
                 "--duration", "4m", "--out", str(tmp_path), "--no-progress", *plots])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 0, out
    assert REPORT_KEYS <= set(report) and report["invariants"]["ok"]
    assert report["sessions"]["hung"] == 0 and report["sessions"]["started"] > 0
    assert set(report["sessions"]) >= {"started", "completed", "failed_with_error", "hung"}
    assert {"p50", "p95"} <= set(report["tokens_per_s_per_client"]) and {"p50_s", "p99_s"} <= set(report["recovery"])
    assert report["coverage"]["timeline"] and report["trace_hash"] in out
    if not plots:
        assert all((tmp_path / f"{p}.png").stat().st_size > 1000 for p in ("coverage", "throughput", "recoveries"))


def test_progress_goes_to_stderr(tmp_path, capsys):
    main(["run", "steady", "--nodes", "4", "--clients", "1", "--duration", "2m", "--out", str(tmp_path), "--no-plots"])
    err = capsys.readouterr().err
    assert "virtual" in err and "100%" in err


def test_a_bad_scenario_exits_2_with_the_reason(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[clients]\nthink = "soon"\n')
    assert main(["run", str(bad), "--out", str(tmp_path)]) == 2
    assert "not a duration" in capsys.readouterr().err


def test_list_names_the_scenarios(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SCENARIOS)


def test_sweep_checks_every_seed_and_names_the_violating_ones(capsys, monkeypatch):
    assert main(["sweep", "mixed-faults", "--seeds", "2", "--nodes", "6", "--clients", "1", "--duration", "2m"]) == 0
    out = capsys.readouterr().out
    assert "seed   0" in out and "seed   1" in out and "2 seeds" in out and "0 violated" in out

    from simulations.model import StandInModel
    monkeypatch.setattr(StandInModel, "reference", lambda self, prompt, n: [0] * n)  # every session now "differs"
    assert main(["sweep", "steady", "--seeds", "2", "--nodes", "8", "--clients", "2", "--duration", "3m"]) == 1
    out = capsys.readouterr().out
    assert "VIOLATED" in out and "replay: python -m simulations run steady --seed " in out
