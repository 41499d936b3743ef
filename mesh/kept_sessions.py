"""Prefix reuse: a client keeps the route of a finished generation open for a while, and a request
whose token ids start with what that route's caches hold continues there.

A chat client (any OpenAI-API client) sends the whole conversation each turn; without reuse every
hop would prefill it again. `KeptSessions` holds finished generations' routes (`KeptRoute`: the
pipeline, the local blocks' run, the token ids its caches hold), each for `keep_s` seconds, at most
`max_routes` of them, fewer while generations run (`make_room`). `take` finds the one sharing the longest prefix with a new request and cuts
it back to the longest exact point within that prefix (`RoutePipeline.can_rewind_to`): the new
request then prefills only its suffix. A kept route is a live session on each node, idle and
counted against the node's budgets like any other: a node that needs the room evicts idle sessions
first, and the client then replays the history elsewhere (failover), so the answer is unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from mesh.first_blocks import LocalRun
from mesh.pipeline import RoutePipeline

log = logging.getLogger("hearth.client")

DEFAULT_MAX_ROUTES = 8


@dataclass
class KeptRoute:
    ids: list[int]  # the tokens the route's caches hold, positions 0 .. len - 1
    pipeline: RoutePipeline
    local: LocalRun | None
    max_length: int  # positions its sessions were opened for
    expires: float  # trio clock


@dataclass(frozen=True)
class Reuse:
    route: KeptRoute
    position: int  # the kept prefix: the request prefills ids[position:]


class KeptSessions:
    def __init__(self, keep_s: float, *, max_routes: int = DEFAULT_MAX_ROUTES):
        if keep_s < 0 or max_routes < 1:
            raise ValueError(f"keep for >= 0 s and at least one route, got {keep_s} s, {max_routes}")
        self.keep_s, self.max_routes = keep_s, max_routes
        self._routes: list[KeptRoute] = []

    def __len__(self) -> int:
        return len(self._routes)

    def take(self, ids: list[int], max_length: int) -> Reuse | None:
        """The kept route sharing the longest exact prefix with `ids` (at least one token, and at
        least one left to feed) among those with room for `max_length` positions, taken out and cut
        back to that prefix; None if no route shares one."""
        best: Reuse | None = None
        now = trio.current_time()
        for route in self._routes:
            if route.expires <= now or route.max_length < max_length:
                continue
            position = _exact_prefix(route, ids)
            if position > 0 and (best is None or position > best.position):
                best = Reuse(route, position)
        if best is None:
            return None
        self._routes.remove(best.route)
        best.route.pipeline.rewind(best.position)  # a no-op where the route holds just that prefix
        return best

    async def put(self, route: KeptRoute) -> None:
        """Keep `route` until `keep_s` from now; the oldest kept route is closed when there are too many."""
        route.expires = trio.current_time() + self.keep_s
        self._routes.append(route)
        while len(self._routes) > self.max_routes:
            await self._close(self._routes.pop(0))

    async def make_room(self, live: int) -> None:
        """Close the oldest kept routes until they and `live` generations together are at most
        `max_routes`: a node limits the sessions one peer holds (8 by default), and idle routes must
        not take a new generation's place."""
        while self._routes and len(self._routes) + live > self.max_routes:
            await self._close(self._routes.pop(0))

    async def expire(self) -> int:
        """Close the routes kept past their time; how many."""
        now = trio.current_time()
        expired = [route for route in self._routes if route.expires <= now]
        self._routes = [route for route in self._routes if route.expires > now]
        for route in expired:
            await self._close(route)
        return len(expired)

    async def close_all(self) -> None:
        routes, self._routes = self._routes, []
        for route in routes:
            await self._close(route)

    @staticmethod
    async def _close(route: KeptRoute) -> None:
        with trio.CancelScope(shield=True):
            await route.pipeline.close()


def _exact_prefix(route: KeptRoute, ids: list[int]) -> int:
    """The longest position <= the common prefix of `route.ids` and `ids`, below len(ids) (a token
    is left to feed, whose logits the request needs), at which the route can be cut exactly."""
    common = 0
    for held, wanted in zip(route.ids, ids):
        if held != wanted:
            break
        common += 1
    for position in range(min(common, len(ids) - 1), 0, -1):
        if route.pipeline.can_rewind_to(position):
            return position
    return 0
