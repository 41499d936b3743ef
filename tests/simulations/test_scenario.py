"""Scenario files: durations, shares of the run, strict keys, and every built-in one loads."""

from __future__ import annotations

import pytest

from simulations.scenario import (
    SCENARIO_DIR, Moment, ScenarioError, load_scenario, parse_duration, scenario_from_dict,
)

BUILT_IN = sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def test_the_issue_s_scenarios_are_there():
    assert {"steady", "evening-churn", "datacenter-outage", "regional-partition", "flash-crowd",
            "swizzle-clog"} <= set(BUILT_IN)


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_built_in_scenario_loads(name):
    scenario = load_scenario(name)
    assert scenario.name == name and scenario.duration_s > 0 and scenario.description


@pytest.mark.parametrize("text, seconds", [("250ms", 0.25), ("30s", 30), ("20m", 1200), ("2h", 7200),
                                           ("1.5h", 5400), (45, 45.0)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["2 hours", "h", "-5s", "", "5x"])
def test_bad_durations_say_what_is_wrong(text):
    with pytest.raises(ScenarioError, match="duration"):
        parse_duration(text)


def test_moments_are_absolute_or_a_share_of_the_run():
    assert Moment.parse("25%", "at").resolve(7200) == 1800
    assert Moment.parse("10m", "at").resolve(7200) == 600


def test_unknown_keys_are_refused_not_ignored():
    with pytest.raises(ScenarioError, match="unknown key.*thnik"):
        scenario_from_dict({"clients": {"thnik": "5s"}})
    with pytest.raises(ScenarioError, match="kind must be one of"):
        scenario_from_dict({"events": [{"kind": "meteor", "at": "5m"}]})


def test_events_need_known_regions():
    with pytest.raises(ScenarioError, match="region 'mars'"):
        scenario_from_dict({"regions": {"na": 1.0}, "events": [{"kind": "partition", "at": "5m", "regions": ["mars"]}]})


def test_device_profiles_extend_the_defaults():
    scenario = scenario_from_dict({"devices": {"laptop": {"block_ms": 3.0}, "phone": {"weight": 0.1}}})
    assert scenario.devices["laptop"].block_ms == 3.0 and scenario.devices["laptop"].weights_gb == 3.0
    assert scenario.devices["phone"].weight == 0.1


def test_command_line_overrides():
    scenario = load_scenario("steady").scaled(nodes=7, clients=3, duration_s=60, seed=9)
    assert (scenario.churn.nodes, scenario.clients.count, scenario.duration_s, scenario.seed) == (7, 3, 60, 9)


def test_missing_file_is_a_scenario_error(tmp_path):
    with pytest.raises(ScenarioError, match="no such scenario"):
        load_scenario(tmp_path / "nope.toml")
