"""Route planning: the cheapest chain of servers covering blocks [start, end), as a pure function.

A server announces a span; a hop may use any sub-range of it (the node runs only those blocks), so
overlapping spans of different lengths combine freely. Cost of a hop = the client's measured round
trip to that server + blocks x the server's seconds per block per token. The graph's vertices are
block boundaries where some span starts or ends; Dijkstra finds the cheapest path from `start` to
`end`. Ties break on fewer hops, then on peer id, so the same snapshot always gives the same route.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

DEFAULT_RTT_S = 0.005  # assumed round trip to a peer never measured
DEFAULT_BLOCK_S = 0.005  # assumed seconds per block per token for a server that announced none


@dataclass(frozen=True)
class ServerSpan:
    """What the route planner knows about one server (a snapshot of its announcement)."""

    peer_id: str
    start: int
    end: int
    block_seconds: float = DEFAULT_BLOCK_S  # seconds per block per decoded token

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

    def __init__(self, start: int, end: int, missing: list[tuple[int, int]]):
        self.start, self.end, self.missing = start, end, missing
        spans = ", ".join(f"[{a}, {b})" for a, b in missing)
        super().__init__(f"no route covers blocks [{start}, {end}): nobody serves {spans}")


def plan_route(servers: Iterable[ServerSpan], start: int, end: int, *,
               rtts: Mapping[str, float] | None = None, banned: Iterable[str] = ()) -> Route:
    """The cheapest chain of hops covering [start, end); raises NoRouteError naming the gaps."""
    banned = set(banned)
    rtts = rtts or {}
    usable = _undominated([s for s in servers if s.peer_id not in banned and s.start < end and s.end > start],
                          start, end, rtts)
    bounds = sorted({start, end} | {min(max(b, start), end) for s in usable for b in (s.start, s.end)})
    covering = {b: [s for s in usable if s.covers(b)] for b in bounds[:-1]}
    best: dict[int, tuple[float, int, tuple[Hop, ...]]] = {start: (0.0, 0, ())}
    queue: list[tuple[float, int, tuple[str, ...], int]] = [(0.0, 0, (), start)]
    while queue:
        cost, n_hops, _, block = heapq.heappop(queue)
        if block == end:
            return Route(best[end][2], cost)
        if best[block][:2] != (cost, n_hops):
            continue  # a stale queue entry
        first = bisect.bisect_right(bounds, block)
        for server in covering[block]:
            rtt = rtts.get(server.peer_id, DEFAULT_RTT_S)
            for stop in bounds[first:bisect.bisect_right(bounds, min(server.end, end))]:
                hop_cost = cost + rtt + (stop - block) * server.block_seconds
                known = best.get(stop)
                if known is not None and hop_cost > known[0]:
                    continue
                hops = best[block][2] + (Hop(server.peer_id, block, stop),)
                key = (hop_cost, n_hops + 1, tuple(h.peer_id for h in hops))
                if known is None or key < (known[0], known[1], tuple(h.peer_id for h in known[2])):
                    best[stop] = (hop_cost, n_hops + 1, hops)
                    heapq.heappush(queue, (hop_cost, n_hops + 1, key[2], stop))
    raise NoRouteError(start, end, uncovered(usable, start, end))


def _undominated(servers: list[ServerSpan], start: int, end: int, rtts: Mapping[str, float]) -> list[ServerSpan]:
    """`servers` less those another server beats on every route: same blocks within [start, end),
    a round trip and a time per block no worse, and an earlier peer id when both are equal."""
    groups: dict[tuple[int, int], list[ServerSpan]] = {}
    for server in servers:
        groups.setdefault((max(server.start, start), min(server.end, end)), []).append(server)
    kept = []
    for group in groups.values():
        group.sort(key=lambda s: (rtts.get(s.peer_id, DEFAULT_RTT_S), s.block_seconds, s.peer_id))
        fastest = math.inf
        for server in group:
            if server.block_seconds < fastest:
                kept.append(server)
                fastest = server.block_seconds
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
