"""Whole runs: determinism, the invariants, real torch math under churn, outage and partition."""

from __future__ import annotations

import dataclasses

import pytest

from simulations.runner import run_scenario
from tests.simulations.conftest import small


def test_same_seed_same_trace_different_seed_different_trace():
    scenario = small("mixed-faults", nodes=8, minutes=6, seed=11)
    first, second = run_scenario(scenario), run_scenario(scenario)
    other = run_scenario(dataclasses.replace(scenario, seed=12))
    assert first.trace_hash == second.trace_hash
    assert [s.to_json() for s in first.sessions] == [s.to_json() for s in second.sessions]
    assert other.trace_hash != first.trace_hash


MIXED_FAULT_SEEDS = 50


@pytest.mark.parametrize("seed", range(MIXED_FAULT_SEEDS))
def test_mixed_faults_invariants_hold(seed):
    """Churn, loss, resets, an outage, a partition, a crowd and a clog in 3 virtual minutes: no session hangs,
    every completed one has the failure-free tokens, KV budgets hold. `python -m simulations sweep mixed-faults`
    runs the same check for any number of seeds at any scale."""
    result = run_scenario(small("mixed-faults", nodes=12, clients=3, minutes=3, seed=seed))
    assert result.ok, f"seed {seed}: {result.violations[:3]}"
    assert result.sessions and all(s.outcome in ("completed", "failed") for s in result.sessions)
    assert all(s.error for s in result.sessions if s.outcome == "failed")  # explicit, with a reason


def test_real_torch_blocks_under_churn_give_the_local_tokens(checkpoint_factory):
    scenario = small("evening-churn", nodes=6, clients=2, minutes=10, seed=0, compute="torch")
    scenario = dataclasses.replace(scenario, network=dataclasses.replace(scenario.network, resets_per_hour=240.0))
    result = run_scenario(scenario, checkpoint=checkpoint_factory("llama"))
    assert result.ok, result.violations[:3]
    completed = [s for s in result.sessions if s.outcome == "completed"]
    assert len(completed) >= 8
    assert sum(len(s.recoveries) for s in completed) >= 5  # the check ran across failovers too


def test_a_violation_names_the_seed_to_replay(monkeypatch):
    from simulations.model import StandInModel
    from simulations.report import build_report, summary

    monkeypatch.setattr(StandInModel, "reference", lambda self, prompt, n: [0] * n)
    result = run_scenario(small("steady", nodes=6, clients=1, minutes=3, seed=5))
    assert not result.ok and "differ from the failure-free run" in result.violations[0]
    assert "--seed 5" in summary(build_report(result, scenario_arg="steady"))


def test_a_session_that_never_ends_is_reported_hung(monkeypatch):
    import trio

    from mesh.client import Client

    async def stuck(self, *args, **kwargs):
        await trio.sleep_forever()
        yield  # pragma: no cover

    monkeypatch.setattr(Client, "generate", stuck)
    result = run_scenario(small("steady", nodes=4, clients=1, minutes=3, seed=1))
    assert result.sessions and all(s.outcome == "hung" for s in result.sessions)
    assert "hung" in result.violations[0]


def test_datacenter_outage_households_keep_serving():
    result = run_scenario(small("datacenter-outage", nodes=16, clients=3, minutes=16, seed=3))
    assert result.ok, result.violations[:3]
    outage = result.marks[0][0]
    before = [s for s in result.sessions if s.ended < outage and s.outcome == "completed"]
    after = [s for s in result.sessions if s.started >= outage]
    assert any(p.startswith("dc") for s in before for p in s.peers)  # the fast cloud hosts were used
    assert after and sum(s.outcome == "completed" for s in after) >= 0.99 * len(after)
    assert not any(s.outcome == "hung" for s in result.sessions)
    assert not any(p.startswith("dc") for s in after for p in s.peers)  # and afterwards only households


def test_partition_each_side_serves_itself():
    scenario = small("regional-partition", nodes=24, clients=4, minutes=16, seed=4)
    result = run_scenario(scenario)
    assert result.ok, result.violations[:3]
    cut, healed = result.marks[0][0], result.marks[1][0]
    during = [s for s in result.sessions if s.started >= cut and s.ended < healed and s.outcome == "completed"]
    assert during, "no session completed during the partition"
    for session in during:  # nobody crossed the cut
        assert all((result.host_regions[p] == "eu") == (session.region == "eu") for p in session.peers), \
            session.to_json()
