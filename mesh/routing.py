"""Route planning: the cheapest chain of servers covering blocks [start, end), as a pure function.

A server announces a span; a hop may use any sub-range of it (the node runs only those blocks), so
overlapping spans of different lengths combine freely. Cost of a hop = the client's measured round
trip to that server + blocks x the server's seconds per block per token, the latter stretched by
the server's load: each session already open there adds `load_weight` of its compute time (a
node batches concurrent decode steps, so one more session costs it a fraction of a step, not a
whole one). A server whose free KV cache cannot hold the session is used only if nothing else
covers its blocks. Two modes weigh these: `LATENCY` for interactive chat (round trips count in
full, load a little) and `THROUGHPUT` for batch jobs (spread over idle servers, round trips count
less). The graph's vertices are block boundaries where some span starts or ends; Dijkstra finds
the cheapest path from `start` to `end`. Ties break on fewer hops, then on peer id, so the same
snapshot always gives the same route.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

DEFAULT_RTT_S = 0.005  # assumed round trip to a peer never measured
DEFAULT_BLOCK_S = 0.005  # assumed seconds per block per token for a server that announced none
CACHE_SHORT_S = 10.0  # added to a hop whose server says its free KV cache cannot hold the session


@dataclass(frozen=True)
class RoutingMode:
    name: str
    rtt_weight: float  # how much a hop's round trip counts
    load_weight: float  # share of a server's compute time each session open there adds


# An int8 decode pass over 8 sessions' rows took 2.9x one row's here (`shard.batch`): each extra
# session costs about a quarter of a step. A batch job weighs load fully, to spread over idle servers.
LATENCY = RoutingMode("latency", rtt_weight=1.0, load_weight=0.25)
THROUGHPUT = RoutingMode("throughput", rtt_weight=0.25, load_weight=1.0)
ROUTING_MODES = {mode.name: mode for mode in (LATENCY, THROUGHPUT)}


class ServerSpan(NamedTuple):
    """What the route planner knows about one server (a snapshot of its announcement). A named
    tuple: a client builds one per record for every plan, a thousand in a large swarm."""

    peer_id: str
    start: int
    end: int
    block_seconds: float = DEFAULT_BLOCK_S  # seconds per block per decoded token
    sessions: int = 0  # open on the server when it was last heard from
    free_cache_tokens: int | None = None  # positions its KV cache can still take; None: unknown

    def covers(self, block: int) -> bool:
        return self.start <= block < self.end


@dataclass(frozen=True)
class Hop:
    peer_id: str
    start: int
    end: int


@dataclass(frozen=True)
class Route:
    hops: tuple[Hop, ...]
    cost_s: float  # estimated seconds per decoded token

    @property
    def peers(self) -> list[str]:
        return [hop.peer_id for hop in self.hops]


class NoRouteError(Exception):
    """No chain of reachable servers covers the blocks; `missing` names the uncovered ones."""

    def __init__(self, start: int, end: int, missing: list[tuple[int, int]], *,
                 refused: dict[str, str] | None = None, who: str = "nobody"):
        self.start, self.end, self.missing, self.refused = start, end, missing, dict(refused or {})
        self.who = who  # whom the planner looked among: "nobody", or "no trusted peer" (a client's trust list)
        spans = ", ".join(f"[{a}, {b})" for a, b in missing)
        why = "".join(f"; {peer} refused us: {reason}" for peer, reason in list(self.refused.items())[:3])
        super().__init__(f"no route covers blocks [{start}, {end}): {who} serves {spans}{why}")


def plan_route(servers: Iterable[ServerSpan], start: int, end: int, *,
               rtts: Mapping[str, float] | None = None, banned: Iterable[str] = (),
               mode: RoutingMode = LATENCY, need_tokens: int = 0) -> Route:
    """The cheapest chain of hops covering [start, end) for a session of `need_tokens` positions;
    raises NoRouteError naming the gaps."""
    usable = _undominated(_costed(servers, start, end, set(banned), rtts or {}, mode, need_tokens), start, end)
    bounds = sorted({start, end} | {min(max(b, start), end) for c in usable for b in (c.server.start, c.server.end)})
    covering = {b: [c for c in usable if c.server.start <= b < c.server.end] for b in bounds[:-1]}
    best: dict[int, tuple[float, int, tuple[Hop, ...]]] = {start: (0.0, 0, ())}
    queue: list[tuple[float, int, tuple[str, ...], int]] = [(0.0, 0, (), start)]
    while queue:
        cost, n_hops, _, block = heapq.heappop(queue)
        if block == end:
            return Route(best[end][2], cost)
        if best[block][:2] != (cost, n_hops):
            continue  # a stale queue entry
        first = bisect.bisect_right(bounds, block)
        for hop_fixed, per_block, server in covering[block]:
            for stop in bounds[first:bisect.bisect_right(bounds, min(server.end, end))]:
                hop_cost = cost + hop_fixed + (stop - block) * per_block
                known = best.get(stop)
                if known is not None and hop_cost > known[0]:
                    continue
                hops = best[block][2] + (Hop(server.peer_id, block, stop),)
                key = (hop_cost, n_hops + 1, tuple(h.peer_id for h in hops))
                if known is None or key < (known[0], known[1], tuple(h.peer_id for h in known[2])):
                    best[stop] = (hop_cost, n_hops + 1, hops)
                    heapq.heappush(queue, (hop_cost, n_hops + 1, key[2], stop))
    raise NoRouteError(start, end, uncovered([c.server for c in usable], start, end))


class _Costed(NamedTuple):
    fixed: float  # what a hop through the server costs whatever its length
    per_block: float  # and per block of it
    server: ServerSpan


def _costed(servers: Iterable[ServerSpan], start: int, end: int, banned: set[str], rtts: Mapping[str, float],
            mode: RoutingMode, need_tokens: int) -> list[tuple[float, float, str, int, ServerSpan]]:
    """The servers that may take part, with their costs: a hop's round trip (and a penalty when the
    server says its KV cache is too full for the session), and its compute per block, stretched by load.

    Plain tuples (fixed, per-block, peer id, index, server), which sort by cost, then peer id: a
    client plans over every record of a large swarm, a thousand for each request."""
    rtt_weight, load_weight, default_rtt = mode.rtt_weight, mode.load_weight, DEFAULT_RTT_S
    costed = []
    for index, server in enumerate(servers):
        peer_id, server_start, server_end, block_seconds, sessions, free = server
        if server_start >= end or server_end <= start or peer_id in banned:
            continue
        fixed = rtt_weight * rtts.get(peer_id, default_rtt)
        if free is not None and free < need_tokens:
            fixed += CACHE_SHORT_S
        costed.append((fixed, block_seconds * (1.0 + load_weight * sessions), peer_id, index, server))
    return costed


def _undominated(servers: list[tuple[float, float, str, int, ServerSpan]], start: int, end: int) -> list[_Costed]:
    """`servers` less those another server beats on every route: same blocks within [start, end),
    a fixed and a per-block cost no worse, and an earlier peer id when both are equal."""
    groups: dict[tuple[int, int], list[tuple[float, float, str, int, ServerSpan]]] = {}
    for costed in servers:
        server = costed[4]
        span = (server.start if server.start > start else start, server.end if server.end < end else end)
        group = groups.get(span)
        if group is None:
            groups[span] = [costed]
        else:
            group.append(costed)
    kept = []
    for group in groups.values():
        group.sort()  # by fixed cost, per-block cost, peer id (then the caller's order)
        fastest = math.inf
        for fixed, per_block, _, _, server in group:
            if per_block < fastest:
                kept.append(_Costed(fixed, per_block, server))
                fastest = per_block
    return kept


def uncovered(servers: Iterable[ServerSpan], start: int, end: int) -> list[tuple[int, int]]:
    """The maximal ranges of [start, end) that no server in `servers` covers."""
    covered = [False] * (end - start)
    for server in servers:
        for block in range(max(server.start, start), min(server.end, end)):
            covered[block - start] = True
    gaps, gap_start = [], None
    for offset, is_covered in enumerate(covered + [True]):
        if not is_covered and gap_start is None:
            gap_start = offset
        elif is_covered and gap_start is not None:
            gaps.append((start + gap_start, start + offset))
            gap_start = None
    return gaps
