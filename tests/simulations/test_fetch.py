"""Downloads in the simulator (`[fetch]`, issue 21): a fresh swarm forms from one seed device."""

from __future__ import annotations

import dataclasses

import pytest
import trio

from simulations.fetch import Flows, Layout
from simulations.runner import run_scenario
from simulations.scenario import ScenarioError, load_scenario, parse_size, scenario_from_dict
from tests.simulations.conftest import small


def tiny_fresh_swarm(seed: int = 2):
    """fresh-swarm with a small model (8 blocks of 1.5 GB in 32 MiB pieces; the seed holds 5 of them
    in memory, a laptop 2, a mini PC 1), 6 hosts arriving within a minute, 40 virtual minutes."""
    scenario = small("fresh-swarm", nodes=6, clients=2, minutes=40, seed=seed)
    return dataclasses.replace(scenario, model=dataclasses.replace(scenario.model, blocks=8, block_params=1.5e9),
                               fetch=dataclasses.replace(scenario.fetch, join_over_s=60.0, piece="32MiB"))


@pytest.fixture(scope="module")
def runs():
    scenario = tiny_fresh_swarm()
    return scenario, run_scenario(scenario, keep_trace=True), run_scenario(scenario)


def test_a_fresh_swarm_reaches_full_coverage_from_one_seed(runs):
    scenario, result, again = runs
    fetch = result.fetch
    assert result.ok, result.violations[:3]
    assert len(fetch["seeds"]) == 1 and fetch["hosts"]["joining"] == 5
    assert fetch["coverage"]["1x_s"] is not None and fetch["hosts"]["serving"] == 5
    assert fetch["bytes"]["pieces"] >= sum(h["download_bytes"] for h in fetch["per_host"]) > 0
    assert fetch["bytes"]["from_seeds"] > 0 and fetch["bytes"]["manifests"] > 0
    completed = fetch["sessions_after_coverage"]
    assert completed["started"] > 0 and completed["hung"] == 0 and completed["completed"] == completed["started"]
    assert result.trace_hash == again.trace_hash  # deterministic for its seed


def test_no_node_serves_before_its_span_is_downloaded(runs):
    scenario, result, _ = runs
    seeds = set(result.fetch["seeds"])
    done: dict[str, set[str]] = {}
    ups = 0
    for line in result.trace_lines:
        _, kind, *fields = line.split(" ")
        values = dict(f.split("=", 1) for f in fields)
        if kind == "fetch_done":
            done.setdefault(values["peer"], set()).add(values["blocks"])
        elif kind == "node_up" and values["peer"] not in seeds:
            assert values["blocks"] in done.get(values["peer"], set()), line
            ups += 1
    assert ups == 5


def test_download_times_are_consistent_with_the_links(runs):
    scenario, result, _ = runs
    layout = Layout(scenario.model.blocks, int(scenario.model.block_params), scenario.fetch.piece_bytes)
    seed_device = scenario.device(scenario.fetch.seed_device)
    seed_up = min(seed_device.uplink_mbps * 1e6 / 8, scenario.fetch.upload_bytes_per_s)
    for host in result.fetch["per_host"]:
        start, end = host["blocks"]
        assert host["span_bytes"] == sum(layout.size(p) for p in layout.pieces(start, end))
        assert host["download_bytes"] <= host["span_bytes"]
        # no faster than its own downlink allows
        assert host["download_s"] >= host["download_bytes"] / host["downlink_bytes_per_s"]
        assert host["up_at"] >= host["arrived"] + host["download_s"]
    # the seed uploads what it uploads no faster than its uplink (and upload limit) allow
    seed_bytes = result.fetch["bytes"]["from_seeds"]
    assert seed_bytes / seed_up <= result.virtual_s
    assert result.fetch["coverage"]["1x_s"] >= min(h["arrived"] for h in result.fetch["per_host"])


async def test_flows_share_the_uplink_and_finish_when_their_bytes_are_through(autojump_clock):
    up, down = {"a": 10e6, "b": 1e6, "c": 1e6}, {"a": 1e6, "b": 100e6, "c": 100e6}
    flows = Flows(up.__getitem__, down.__getitem__)
    finished = {}

    async def send(dst: str, size: int) -> None:
        await flows.transfer("a", dst, size)
        finished[dst] = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, "b", 5_000_000)
        nursery.start_soon(send, "c", 10_000_000)
    # 5 MB each at 5 MB/s (a's uplink shared), then c's last 5 MB alone at 10 MB/s
    assert finished["b"] == pytest.approx(1.0) and finished["c"] == pytest.approx(1.5)
    assert not flows.up["a"] and not flows.down["b"]


def test_layout_cuts_blocks_into_pieces():
    layout = Layout(blocks=4, block_bytes=10 << 20, piece_bytes=4 << 20)  # 40 MiB: 10 pieces
    assert layout.count == 10 and layout.pieces(0, 1) == range(0, 3) and layout.pieces(1, 2) == range(2, 5)
    assert layout.pieces(0, 4) == range(10) and layout.size(9) == 4 << 20


def test_fetch_settings_are_checked():
    assert parse_size("4MiB") == 4 << 20 and parse_size("32MB") == 32_000_000 and parse_size(512) == 512
    with pytest.raises(ScenarioError, match="piece"):
        scenario_from_dict({"fetch": {"seeds": 1, "piece": "3MiB"}})
    with pytest.raises(ScenarioError, match="seeds"):
        scenario_from_dict({"churn": {"nodes": 2}, "fetch": {"seeds": 3}})
    with pytest.raises(ScenarioError, match="no device profile"):
        scenario_from_dict({"fetch": {"seeds": 1, "seed_device": "toaster"}})
    assert load_scenario("fresh-swarm").fetch.seeds == 1
