"""Households behind NAT in the simulator (issue 24): the real ReachKeeper on every host, relays,
hole punching by the client, and a relay killed mid-run; and the `[nat]` settings' checks."""

from __future__ import annotations

import pytest

from simulations.report import build_report, summary
from simulations.runner import run_scenario
from simulations.scenario import ScenarioError, load_scenario, scenario_from_dict
from tests.simulations.conftest import small


@pytest.fixture(scope="module")
def nat_run():
    """`nat-households` small: 12 hosts, 4 users, 12 virtual minutes, the busiest relay killed at 6."""
    return run_scenario(small("nat-households", nodes=12, clients=4, minutes=12, seed=24))


def test_sessions_through_relays_and_punched_holes_complete_with_the_reference_tokens(nat_run):
    result = nat_run
    assert result.ok, result.violations[:3]  # among them: every completed session has the failure-free tokens
    report = build_report(result, scenario_arg="nat-households")
    nat = report["nat"]
    assert nat["behind_nat"]["households"].get("symmetric", 0) > 0 and nat["verdicts"].get("private", 0) > 0
    assert nat["hops"]["relayed"] > 0 and nat["hops"]["hole-punched"] > 0
    assert nat["counts"]["reservations"] >= 2 * nat["verdicts"]["private"]  # two slots each, and again after the kill
    assert nat["completion_rate"] >= 0.95 and report["sessions"]["hung"] == 0
    assert nat["coverage_reachable"]["mean"] >= 0.9
    assert "NAT: households" in summary(report)


def test_after_the_relay_failure_sessions_still_complete(nat_run):
    report = build_report(nat_run, scenario_arg="nat-households")
    nat = report["nat"]
    assert nat["relays_killed"] and len(nat["relays_killed"]) == 1
    after = nat["after_relay_failure"]
    assert after["started"] >= 5 and after["completed"] >= 0.95 * after["started"] and after["hung"] == 0


def test_a_nat_run_replays_hash_for_hash(nat_run):
    again = run_scenario(small("nat-households", nodes=12, clients=4, minutes=12, seed=24))
    assert again.trace_hash == nat_run.trace_hash and again.nat == nat_run.nat


def test_without_nat_no_keeper_runs_and_no_draw_is_taken():
    result = run_scenario(small("steady", nodes=4, clients=1, minutes=2, seed=2))
    assert result.nat == {} and build_report(result)["nat"] is None
    assert not load_scenario("steady").nat.enabled and load_scenario("nat-households").nat.enabled


@pytest.mark.parametrize("nat, reason", [
    ({"households": 1.5}, "households is the share behind NAT"),
    ({"clients": -0.1}, "clients is the share behind NAT"),
    ({"types": {"cone": 1.0}}, "types maps some of full-cone"),
    ({"types": {"symmetric": 0.0}}, "not all 0"),
    ({"relays": -1}, "relays must be a whole number"),
    ({"punch": "always"}, "punch must be one of client, on-connect"),
    ({"households": 0.5, "public_relay": False}, "households behind NAT need relays"),
    ({"relays": 1, "relay_device": "toaster"}, "no device profile named 'toaster'"),
    ({"relays": 1, "check_every": "0s"}, "check_every and watch_every must be positive"),
    ({"relays": 1, "wants": 2}, "unknown key"),
])
def test_nat_settings_are_checked(nat, reason):
    with pytest.raises(ScenarioError, match=reason):
        scenario_from_dict({"nat": nat})


def test_a_relay_failure_needs_relays():
    with pytest.raises(ScenarioError, match="relay-failure needs nat.relays >= 1"):
        scenario_from_dict({"events": [{"kind": "relay-failure", "at": "50%"}]})
    with pytest.raises(ScenarioError, match="hosts 3"):
        scenario_from_dict({"nat": {"relays": 2}, "events": [{"kind": "relay-failure", "at": "50%", "hosts": 3}]})
