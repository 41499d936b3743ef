"""What the swarm page and /metrics say, on the in-memory transport in virtual time: the swarm view
tells a gap, a rebalancing move and a crash; a node's metrics count sessions, steps, the move and
what a refusal was; the Host and Origin rules, and JSON log lines."""

from __future__ import annotations

import json
import logging

import pytest
import trio

from mesh.routing import NoRouteError
from node.http_guard import host_allowed, host_name
from node.logs import JsonFormatter
from node.swarm_view import SwarmWatch, gaps
from shard.sampling import SamplingParams
from tests.mesh.test_failover_memory import PROMPT, TOKENS, FaultySwarm
from tests.node.test_rebalance import add_balanced


@pytest.fixture
async def swarm(checkpoint_factory):
    async with trio.open_nursery() as nursery:
        yield FaultySwarm(checkpoint_factory("llama"), nursery)
        nursery.cancel_scope.cancel()


def sample(node, name: str, **labels) -> float:
    return node.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_the_swarm_view_shows_a_gap_a_move_and_a_crash(autojump_clock, swarm):
    steady = await swarm.add_node("a", 0, 3)
    mover = await add_balanced(swarm, "b", 0, 3)
    client = await swarm.client()
    watch = SwarmWatch(client, wall_clock=trio.current_time, min_interval_s=0.0)

    view = await watch.snapshot()
    assert view["coverage"] == [2, 2, 2, 0, 0, 0] and view["gaps"] == [[3, 6]] and view["events"] == []
    assert {peer["peer_id"]: peer["online"] for peer in view["peers"]} == {"a": True, "b": True}

    await trio.sleep(100)  # the mover re-evaluates within every_s (60 s) x 1.5 and moves to [3, 6)
    view = await watch.snapshot()
    assert view["gaps"] == [] and view["coverage"] == [1] * 6
    assert [(e["kind"], e["peer_id"], e["text"]) for e in view["events"]] == [("moved", "b", "b moved from blocks 0:3 to 3:6")]
    assert sample(mover, "hearth_rebalance_moves_total") == 1
    assert sample(mover, "hearth_span_blocks", bound="start") == 3

    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    for node in (steady, mover):
        assert sample(node, "hearth_sessions_opened_total") == 1
        assert sample(node, "hearth_steps_total", kind="prefill") == 1
        assert sample(node, "hearth_steps_total", kind="decode") == len(report.token_ids) - 1
        assert sample(node, "hearth_sessions_open") == 0

    swarm.network.crash("a")
    view = await watch.snapshot()
    assert view["gaps"] == [[0, 3]] and [peer["online"] for peer in view["peers"]] == [False, True]
    assert view["events"][0]["kind"] == "left" and view["events"][0]["peer_id"] == "a"


async def test_a_refusal_is_counted_by_its_code(autojump_clock, swarm):
    node = await swarm.add_node("a", 0, 6)
    node.manager.draining = True  # a node shutting down refuses new sessions
    client = await swarm.client(request_timeout_s=5.0)
    with pytest.raises(NoRouteError, match=r"nobody serves \[0, 6\)"):  # the refusing node is banned: none is left
        await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=2))
    assert sample(node, "hearth_sessions_refused_total", code="shutting_down") >= 1
    assert sample(node, "hearth_sessions_opened_total") == 0


def test_gaps_are_half_open_ranges_of_uncovered_blocks():
    assert gaps([1, 0, 0, 2, 0]) == [[1, 3], [4, 5]] and gaps([1, 1]) == [] and gaps([0]) == [[0, 1]]


@pytest.mark.parametrize("header, name", [("127.0.0.1:8000", "127.0.0.1"), ("[::1]:8000", "::1"), ("::1", "::1"),
                                          ("LocalHost", "localhost"), ("evil.example:80", "evil.example")])
def test_host_names_are_read_without_their_port(header, name):
    assert host_name(header) == name


@pytest.mark.parametrize("name, bind, allowed", [
    ("localhost", "127.0.0.1", True), ("app.localhost", "127.0.0.1", True), ("127.0.0.2", "127.0.0.1", True),
    ("attacker.example", "127.0.0.1", False), ("192.168.1.20", "127.0.0.1", False),
    ("192.168.1.20", "192.168.1.20", True), ("attacker.example", "192.168.1.20", False),
    ("anything.example", "0.0.0.0", True),  # a wildcard bind needs an API key, which guards it
])
def test_the_host_header_must_name_this_server(name, bind, allowed):
    assert host_allowed(name, bind) is allowed


def test_a_json_log_line_is_one_object_with_its_traceback_inside():
    try:
        raise ValueError("bad\nthing")
    except ValueError as err:
        record = logging.LogRecord("hearth.node", logging.ERROR, __file__, 1, "failed: %s", (err,), (type(err), err, None))
    line = JsonFormatter().format(record)
    event = json.loads(line)
    assert "\n" not in line and event["level"] == "error" and event["logger"] == "hearth.node"
    assert event["message"] == "failed: bad\nthing" and "ValueError" in event["exception"]
    assert event["time"].endswith("Z")
