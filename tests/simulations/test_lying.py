"""Lying hosts in the simulator (issue 19): a host whose node adds noise to its outputs
(`node.chaos.Chaos`) is caught by the clients' spot checks, banned and its tokens redone, so every
completion is the failure-free run's; without checks the same lie shows as wrong tokens.
"""

from __future__ import annotations

import dataclasses

import pytest

from simulations.report import verification_summary
from simulations.runner import run_scenario
from simulations.scenario import ScenarioError, scenario_from_dict
from tests.simulations.conftest import small


def test_liars_are_caught_banned_and_every_completion_is_right():
    scenario = small("lying", nodes=10, clients=3, minutes=4, seed=1)
    result, again = run_scenario(scenario), run_scenario(scenario)
    assert result.trace_hash == again.trace_hash
    assert result.ok, result.violations[:3]  # no wrong tokens, no honest peer banned
    assert result.sessions and all(s.outcome == "completed" for s in result.sessions)
    v = verification_summary(result)
    assert v["liars"] == v["liars_met"] == v["liars_banned"] == 1 and v["honest_banned"] == []
    assert v["steps_corrupted"] > 0 and v["disagreements"] > 0 and v["rollbacks"] > 0
    assert v["tokens_redone"] > 0 and 0 < v["redone_share"] < 0.1
    assert v["client_liar_bans"] == v["detection_s"]["count"] > 0 and v["detection_s"]["max"] < 60
    assert not any(set(s.peers) & {"x0"} for s in result.sessions)  # no completion ends on the liar's route


def test_without_checks_a_lie_gives_wrong_tokens():
    result = run_scenario(small("lying", nodes=10, clients=3, minutes=4, seed=1).scaled(verify_rate=0.0))
    assert result.hostile["steps_corrupted"] > 0
    assert any("differ from the failure-free run" in v for v in result.violations)


@pytest.mark.parametrize("bad, reason", [({"hostile": {"corrupt": 0}}, "corrupt"),
                                         ({"hostile": {"corrupt_probability": 1.5}}, "corrupt_probability"),
                                         ({"clients": {"verify_rate": 2}}, "verify_rate")])
def test_lying_settings_are_checked(bad, reason):
    with pytest.raises(ScenarioError, match=reason):
        scenario_from_dict(bad)


def test_a_lie_no_arbiter_can_decide_fails_the_request_instead_of_giving_wrong_tokens():
    """Two liars among eight honest hosts: one copied a span only one honest host serves, so a
    check of it has a checker and no third opinion (the simulator's client cannot compute blocks)."""
    scenario = small("lying", nodes=8, clients=3, minutes=4, seed=1)
    scenario = dataclasses.replace(scenario, hostile=dataclasses.replace(scenario.hostile, fraction=0.2))
    result = run_scenario(scenario)
    assert result.ok, result.violations[:3]  # before mesh.spot_check failed such a request: wrong tokens
    undecided = [s for s in result.sessions if "no arbiter decided" in s.error]
    assert undecided and all(s.error.startswith("GenerationFailed") for s in undecided)
