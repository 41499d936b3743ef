"""Route planning on hand-made snapshots of announced spans."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.client import ClientOptions
from mesh.routing import DEFAULT_RTT_S, LATENCY, THROUGHPUT, Hop, NoRouteError, ServerSpan, plan_route, uncovered
from shard.errors import InvalidInput


def test_single_server_covering_everything():
    route = plan_route([ServerSpan("a", 0, 8)], 0, 8)
    assert route.hops == (Hop("a", 0, 8),)


def test_chain_of_three_thirds():
    servers = [ServerSpan("c", 6, 9), ServerSpan("a", 0, 3), ServerSpan("b", 3, 6)]
    assert plan_route(servers, 0, 9).peers == ["a", "b", "c"]


def test_overlapping_spans_of_different_lengths_are_cut_to_fit():
    servers = [ServerSpan("long", 0, 6), ServerSpan("tail", 4, 8)]
    route = plan_route(servers, 0, 8)
    assert route.hops == (Hop("long", 0, 6), Hop("tail", 6, 8))


def test_fast_server_preferred_over_slow_one():
    servers = [ServerSpan("slow", 0, 8, block_seconds=0.010), ServerSpan("fast", 0, 8, block_seconds=0.002)]
    assert plan_route(servers, 0, 8).peers == ["fast"]


def test_round_trips_weigh_against_extra_hops():
    servers = [ServerSpan("whole", 0, 8, block_seconds=0.003),
               ServerSpan("left", 0, 4, block_seconds=0.002), ServerSpan("right", 4, 8, block_seconds=0.002)]
    # two hops save 8 ms of compute but cost an extra round trip
    assert plan_route(servers, 0, 8, rtts={"whole": 0.001, "left": 0.001, "right": 0.001}).peers == ["left", "right"]
    assert plan_route(servers, 0, 8, rtts={"whole": 0.001, "left": 0.02, "right": 0.02}).peers == ["whole"]


def test_banned_peers_are_skipped():
    servers = [ServerSpan("a", 0, 8), ServerSpan("b", 0, 4), ServerSpan("c", 4, 8)]
    assert plan_route(servers, 0, 8, banned={"a"}).peers == ["b", "c"]


def test_route_for_a_sub_range_of_blocks_replaces_one_hop():
    servers = [ServerSpan("a", 0, 5), ServerSpan("b", 3, 9), ServerSpan("c", 5, 9)]
    route = plan_route(servers, 3, 6, banned={"x"})
    assert route.hops[0].start == 3 and route.hops[-1].end == 6


def test_no_route_names_the_missing_blocks():
    servers = [ServerSpan("a", 0, 3), ServerSpan("b", 5, 7)]
    with pytest.raises(NoRouteError) as err:
        plan_route(servers, 0, 9)
    assert err.value.missing == [(3, 5), (7, 9)]
    assert "[3, 5)" in str(err.value) and "[7, 9)" in str(err.value)


def test_banning_the_only_server_of_a_range_leaves_a_gap():
    with pytest.raises(NoRouteError) as err:
        plan_route([ServerSpan("a", 0, 4), ServerSpan("b", 4, 8)], 0, 8, banned=["b"])
    assert err.value.missing == [(4, 8)]


def test_same_snapshot_same_route_whatever_the_order():
    servers = [ServerSpan(p, s, e) for p, s, e in [("x", 0, 4), ("y", 0, 4), ("z", 4, 8), ("w", 4, 8)]]
    routes = {tuple(plan_route(order, 0, 8).hops) for order in (servers, servers[::-1], servers[1:] + servers[:1])}
    assert len(routes) == 1


def test_uncovered():
    assert uncovered([ServerSpan("a", 2, 4)], 0, 6) == [(0, 2), (4, 6)]
    assert uncovered([], 0, 3) == [(0, 3)]
    assert uncovered([ServerSpan("a", 0, 3)], 0, 3) == []


def _cheapest_cost(servers, start, end, rtts):
    """Brute force over every block boundary: the least cost to reach each block from `start`."""
    cost = {start: 0.0}
    for block in range(start, end):
        if block not in cost:
            continue
        for s in servers:
            if s.covers(block):
                for stop in range(block + 1, min(s.end, end) + 1):
                    c = cost[block] + rtts.get(s.peer_id, DEFAULT_RTT_S) + (stop - block) * s.block_seconds
                    cost[stop] = min(cost.get(stop, math.inf), c)
    return cost.get(end)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(1, 6), st.sampled_from([0.001, 0.002, 0.005]),
                          st.sampled_from([0.001, 0.01, 0.05])), min_size=1, max_size=12),
       st.integers(0, 4), st.integers(6, 12))
def test_the_route_is_the_cheapest_chain(spans, start, end):
    servers = [ServerSpan(f"p{i}", a, min(a + n, 12), block_seconds=b) for i, (a, n, b, _) in enumerate(spans)]
    rtts = {f"p{i}": rtt for i, (*_, rtt) in enumerate(spans)}
    best = _cheapest_cost(servers, start, end, rtts)
    if best is None:
        with pytest.raises(NoRouteError):
            plan_route(servers, start, end, rtts=rtts)
        return
    route = plan_route(servers, start, end, rtts=rtts)
    assert route.cost_s == pytest.approx(best)
    assert route.hops[0].start == start and route.hops[-1].end == end
    assert all(a.end == b.start for a, b in zip(route.hops, route.hops[1:]))


# --- load-aware routing ---------------------------------------------------------------------------


def test_a_busy_server_loses_to_a_slightly_slower_idle_one():
    servers = [ServerSpan("busy", 0, 8, block_seconds=0.002, sessions=8),
               ServerSpan("idle", 0, 8, block_seconds=0.003, sessions=0)]
    assert plan_route(servers, 0, 8).peers == ["idle"]  # 2 ms x (1 + 0.25 x 8) = 6 ms a block vs 3 ms
    servers[0] = ServerSpan("busy", 0, 8, block_seconds=0.002, sessions=1)
    assert plan_route(servers, 0, 8).peers == ["busy"]  # one session costs it only a quarter of a step


def test_throughput_mode_spreads_over_idle_servers_and_weighs_round_trips_less():
    servers = [ServerSpan("near-busy", 0, 8, block_seconds=0.002, sessions=2),
               ServerSpan("far-idle", 0, 8, block_seconds=0.002, sessions=0)]
    rtts = {"near-busy": 0.001, "far-idle": 0.030}
    # chat: the 29 ms round trip outweighs 2 x 0.25 x 16 ms of load; a batch job: 16 ms x 2 > 0.25 x 29 ms
    assert plan_route(servers, 0, 8, rtts=rtts, mode=LATENCY).peers == ["near-busy"]
    assert plan_route(servers, 0, 8, rtts=rtts, mode=THROUGHPUT).peers == ["far-idle"]


def test_a_server_short_of_kv_cache_is_used_only_when_nothing_else_covers_its_blocks():
    servers = [ServerSpan("full", 0, 8, block_seconds=0.001, free_cache_tokens=100),
               ServerSpan("roomy", 0, 8, block_seconds=0.005, free_cache_tokens=10_000)]
    assert plan_route(servers, 0, 8, need_tokens=512).peers == ["roomy"]
    assert plan_route(servers, 0, 8, need_tokens=64).peers == ["full"]  # the session fits: fastest wins
    assert plan_route(servers[:1], 0, 8, need_tokens=512).peers == ["full"]  # the only one: still a route
    unknown = [ServerSpan("unknown", 0, 8, block_seconds=0.001), servers[1]]
    assert plan_route(unknown, 0, 8, need_tokens=512).peers == ["unknown"]  # no figure: no penalty


def test_routing_mode_names_are_checked_by_the_client_options():
    assert ClientOptions(routing="throughput").routing == "throughput"
    with pytest.raises(InvalidInput, match="routing mode 'fastest'"):
        ClientOptions(routing="fastest")
