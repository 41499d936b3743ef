"""Hostile hosts in the simulator (issue 18, the last "done when"): a share of the swarm forges
records, hoards session slots, rewinds prefills and stalls the sessions it lures, against the real
node and client code; the honest sessions still all end (none hangs) and complete as often as in
the same run without the attackers.

"Within 2%" is read as relative: the completion rate with the attackers is at least 98 % of the
rate without them (at rates up to 100 % that is also within 2 percentage points).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import trio
import trio.testing

from mesh.discovery import MAX_AHEAD_S, InvalidRecord, MemoryDirectory, PeerRecord, SealedView
from protocol import SpanInfo
from simulations.hostile import StallingStream
from simulations.runner import run_scenario
from simulations.scenario import ScenarioError, hostile_hosts, load_scenario, scenario_from_dict
from tests.simulations.conftest import small

SEED = 6


def completion_rate(result) -> float:
    return sum(s.outcome == "completed" for s in result.sessions) / len(result.sessions)


def test_hostile_hosts_attack_and_honest_sessions_complete_as_without_them():
    scenario = small("hostile", nodes=8, clients=3, minutes=5, seed=SEED)
    # two hostile hosts among eight honest ones, each hoarding on half of them: where both do, slots run out
    scenario = dataclasses.replace(scenario, hostile=dataclasses.replace(scenario.hostile, fraction=0.2,
                                                                         hoard_targets=4, forge_every_s=5.0))
    attacked, again, baseline = run_scenario(scenario), run_scenario(scenario), run_scenario(scenario.scaled(hostile=0))
    assert attacked.trace_hash == again.trace_hash  # deterministic, attackers included
    assert not baseline.hostile and baseline.trace_hash != attacked.trace_hash
    for result in (attacked, baseline):
        assert result.ok, result.violations[:3]
        assert result.sessions and all(s.outcome in ("completed", "failed") for s in result.sessions)
    assert completion_rate(attacked) >= 0.98 * completion_rate(baseline), \
        (completion_rate(attacked), completion_rate(baseline))

    hostile, counts = attacked.hostile, attacked.hostile["counts"]
    assert hostile["hosts"] == 2
    assert counts["forgeries_refused"] > 0 and counts.get("forgeries_accepted", 0) == 0
    assert counts["hoard_refused_per_peer"] > 0  # the per-peer session cap
    assert counts["keepalive_lost_evicted"] > 0  # idle hoarded slots freed for honest clients
    assert counts["rewinds"] > 0 and counts.get("rewind_lost_other", 0) == 0  # rewinds say so (Step.rewind)
    assert counts["stalls"] > 0 and hostile["failovers_from_hostile"] > 0  # caught by timeouts, replayed elsewhere
    for session in attacked.sessions:  # a peer that failed a request is not planned in it again (mesh.pipeline)
        failed_peers = [recovery["failed_peer"] for recovery in session.recoveries]
        assert len(failed_peers) == len(set(failed_peers)), session.to_json()


def test_a_peer_that_stalled_a_request_is_not_planned_in_it_again():
    """Six stalling liars beside six honest nodes: a liar's ban (15 s at first) runs out within a
    request that meets several of them, and the planner still ranks it first on its announced
    throughput. Before `mesh.pipeline.RoutePipeline` left a request's failed peers out of its later
    plans, this seed's sessions went back to a liar that had already stalled them 11 times, and its
    slowest took 156 s."""
    scenario = small("hostile", nodes=6, clients=3, minutes=4, seed=1)
    scenario = dataclasses.replace(scenario, hostile=dataclasses.replace(scenario.hostile, fraction=0.5,
                                                                         behaviours=["stall"]))
    result = run_scenario(scenario)
    assert result.ok, result.violations[:3]
    assert result.sessions and all(s.outcome == "completed" for s in result.sessions)
    assert result.hostile["failovers_from_hostile"] >= 10
    for session in result.sessions:
        failed_peers = [recovery["failed_peer"] for recovery in session.recoveries]
        assert len(failed_peers) == len(set(failed_peers)), session.to_json()
    assert max(s.ended - s.started for s in result.sessions) < 120


def test_the_command_line_runs_the_baseline_beside_and_reports_both(tmp_path, capsys):
    from simulations.__main__ import main

    code = main(["run", "hostile", "--seed", "2", "--nodes", "6", "--clients", "1", "--duration", "2m",
                 "--hostile", "0.25", "--baseline", "--out", str(tmp_path), "--no-progress", "--no-plots"])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 0, out
    assert report["hostile"]["hosts"] == 2 and report["hostile"]["counts"]["forgeries_refused"] > 0
    baseline = report["baseline"]
    assert baseline["sessions"]["started"] > 0 and baseline["invariants"]["ok"]
    assert baseline["replay"].endswith("--hostile 0") and report["replay"].endswith("--hostile 0.25")
    assert "hostile: 2 hosts" in out and "without the hostile hosts (same seed" in out and "points" in out


def test_a_peer_announces_only_its_own_records_and_none_pinned():
    async def main():
        directory = MemoryDirectory(trio.current_time)
        info = SpanInfo(model_id="m", manifest_hash="h", start=0, end=4, quantization="none", throughput=10.0,
                        free_cache_tokens=100, sessions=0)
        own, mallory = SealedView(directory, "a", clock=trio.current_time), SealedView(directory, "x",
                                                                                      clock=trio.current_time)
        genuine = PeerRecord("a", ("/memory/internet/a/p2p/a",), info, trio.current_time() + 30)
        await own.announce(genuine)
        lure = PeerRecord("a", ("/memory/internet/x/p2p/x",), dataclasses.replace(info, throughput=1e9),
                          trio.current_time() + 30)
        with pytest.raises(InvalidRecord, match="record of peer a signed by x"):
            await mallory.announce(lure)
        with pytest.raises(InvalidRecord, match="signed by x"):
            await mallory.withdraw("a", "h")
        with pytest.raises(InvalidRecord, match="the limit is 60 s"):
            await mallory.announce(PeerRecord("x", (), info, trio.current_time() + 3600))
        assert await mallory.lookup("h") == [genuine]

    trio.run(main)


def test_the_sealed_views_limit_is_the_dhts():
    from mesh.dht import MAX_TTL_S

    assert MAX_AHEAD_S == MAX_TTL_S


class Recorded:
    peer_id, local_host, remote_host = "client", None, None

    def __init__(self):
        self.written: list[bytes] = []

    async def send_all(self, data: bytes) -> None:
        self.written.append(data)


@pytest.mark.parametrize("half", [False, True])
def test_a_stalling_stream_lets_its_frames_through_then_stalls(half):
    stalls = []

    async def main():
        raw = Recorded()
        stream = StallingStream(raw, 2, half, stalls.append)
        for frame in (b"hello", b"opened", b"result"):
            await stream.send_all(frame)
        with trio.move_on_after(60) as scope:
            await stream.send_all(b"next frame")
        assert scope.cancelled_caught  # it never returns
        return raw.written

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == \
        [b"hello", b"opened", b"result"] + ([b"next "] if half else [])
    assert len(stalls) == 1


def test_the_hostile_section_is_checked():
    assert hostile_hosts(load_scenario("hostile").scaled(nodes=45, hostile=0.1)) == 5
    assert hostile_hosts(load_scenario("steady")) == 0
    for bad, reason in (({"fraction": 1.0}, "fraction"), ({"behaviours": ["bribe"]}, "behaviours"),
                        ({"stall_frames": [3, 1]}, "stall_frames"), ({"keepalive": "0s"}, "keepalive"),
                        ({"hoard_slots": 3}, "unknown key")):
        with pytest.raises(ScenarioError, match=reason):
            scenario_from_dict({"hostile": bad})
