"""A route of hop sessions that heals itself: failover by replaying each failed hop's history.

When a hop fails (its stream resets or ends, a step times out, or the node answers with an error
that says retrying elsewhere can help), the peer is banned for a while, a replacement is planned
for exactly that hop's blocks (possibly several peers with other span boundaries), sessions are
opened there, and the failed hop's history (every input it was sent, in the original chunks) is
replayed so the new KV caches hold the same positions: in one message per hop whose node runs the
chunks one after another (capability `replay-chunks`), else step by step. Replacements speak the
failed hop's codec (whatever the client's codec option would pick for their links), so they are
sent the same values the failed hop was. The step in flight then continues from the
replacement, so greedy output is identical to a run without failure. What a node's `Error` means
(retry elsewhere, busy, fatal) is `protocol.classify`'s reading, carried by `HopFailed.retry`. Without any route the client
waits for coverage, with backoff, until its deadline, then raises `NoRouteError`.

A peer that failed this request (not merely busy) is left out of its later plans even once its ban
has run out, as long as a route exists without it: a ban is short (15 s at first), a step timeout is
not (10 s), and a peer that over-announces its throughput and then stalls would otherwise be planned
again and again within one request (issue 18; the simulator's `hostile` scenario).

A hop whose stream ran through a relay and broke (`HopFailed.relay_lost`) is replaced the same way
but its peer is not banned: the relay went, not necessarily the peer, which the next plan may reach
again directly (hole-punched) or through another relay; if it is really gone, that dial fails and
bans it then.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import trio

from mesh.backoff import BanList, backoff_delay
from mesh.routing import NoRouteError, Route
from mesh.session import HopFailed, HopSession, StepRecord
from protocol import Codec, Retry

log = logging.getLogger("hearth.client")

Planner = Callable[[int, int, frozenset[str]], Awaitable[Route]]
Opener = Callable[[str, int, int, Codec | None], Awaitable[HopSession]]  # codec None: the client's choice
Observer = Callable[[HopSession, int, np.ndarray], None]  # (hop, start position, its output) of each forward step


class GenerationFailed(Exception):
    """The request could not finish by its deadline; says why."""


@dataclass
class Recovery:
    failed_peer: str
    start: int
    end: int
    reason: str
    replacements: list[str]
    tokens_replayed: int
    seconds: float  # from detecting the failure to the replacement holding the history
    detected_at: float = 0.0  # trio clock

    def to_json(self) -> dict:
        return {"failed_peer": self.failed_peer, "blocks": [self.start, self.end], "reason": self.reason,
                "replacements": self.replacements, "tokens_replayed": self.tokens_replayed,
                "seconds": round(self.seconds, 4)}


@dataclass(frozen=True)
class StepTiming:
    base_s: float = 10.0
    per_token_s: float = 0.05

    def timeout(self, tokens: int) -> float:
        return self.base_s + self.per_token_s * tokens


class RoutePipeline:
    def __init__(self, plan: Planner, open_hop: Opener, *, deadline: float, rng: random.Random,
                 bans: BanList, timing: StepTiming = StepTiming()):
        self.plan, self.open_hop = plan, open_hop
        self.deadline, self.rng, self.bans, self.timing = deadline, rng, bans, timing
        self.hops: list[HopSession] = []
        self.recoveries: list[Recovery] = []
        self.observe: Observer | None = None  # sees every hop's output of `forward` (not replays): mesh.spot_check
        self.failed: set[str] = set()  # peers that failed this request (not merely busy)

    async def open(self, start: int, end: int) -> None:
        self.hops = await self._cover(start, end, [])

    def restart(self, deadline: float) -> None:
        """Serve another request on these hops (prefix reuse): a new deadline, its own recoveries."""
        self.deadline, self.recoveries = deadline, []

    async def forward(self, hidden: np.ndarray, position: int) -> np.ndarray:
        """Run `hidden` [B, T, D] at `position` through every hop, replacing hops that fail."""
        index, decoded_from = 0, None
        while index < len(self.hops):
            hop = self.hops[index]
            try:
                hidden = await hop.step(hidden, position, timeout=self._timeout(hidden.shape[1]),
                                        decoded_from=decoded_from)
                decoded_from = hop.answer  # the next hop may be sent it as it came (same values)
                if self.observe is not None:
                    self.observe(hop, position, hidden)
                index += 1
            except HopFailed as err:
                if err.retry is Retry.FATAL:
                    raise
                await self._replace(index, err)
        return hidden

    def rewind(self, position: int) -> None:
        """Go back to `position` (where `can_rewind_to` says the histories stay exact): every hop
        forgets its inputs from there, and the next `forward` starts there, saying so (each node
        cuts its cache there)."""
        for hop in self.hops:
            hop.rewind(position)

    def can_rewind_to(self, position: int) -> bool:
        return all(hop.can_rewind_to(position) for hop in self.hops)

    @property
    def chunk_invariant(self) -> bool:
        """Every hop's outputs are independent of how positions were split into steps."""
        return all(hop.chunk_invariant for hop in self.hops)

    @property
    def rewinds_steps(self) -> bool:
        """Every hop computes short steps row-exactly and takes rewinds (speculation is exact)."""
        return all(hop.rewinds_steps for hop in self.hops)

    async def evict(self, peer_id: str, reason: str) -> None:
        """Ban `peer_id` for good and replace every hop it serves, replaying their history elsewhere."""
        self.bans.ban_for_good(peer_id)
        while (index := next((i for i, hop in enumerate(self.hops) if hop.peer_id == peer_id), None)) is not None:
            hop = self.hops[index]
            await self._replace(index, HopFailed(peer_id, hop.start, hop.end, reason))

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            for hop in self.hops:
                await hop.close()

    async def _replace(self, index: int, err: HopFailed) -> None:
        failed = self.hops[index]
        started = trio.current_time()
        if err.relay_lost:  # the relay went, not necessarily the peer: it may be reached another way
            log.warning("%s (through a relay); replaying %d tokens on a new path", err, failed.length)
        else:
            length = self._ban(failed.peer_id, started, busy=err.busy)
            banned = "for good" if self.bans.banned_for_good(failed.peer_id) else f"for {length:.0f} s"
            log.warning("%s; banned %s, replaying %d tokens elsewhere", err, banned, failed.length)
        with trio.CancelScope(shield=True):
            await failed.close()
        replacements = await self._cover(failed.start, failed.end, failed.history, codec=failed.codec)
        self.hops[index : index + 1] = replacements
        self.recoveries.append(Recovery(
            failed.peer_id, failed.start, failed.end, err.reason, [h.peer_id for h in replacements],
            failed.length, trio.current_time() - started, started))

    async def _cover(self, start: int, end: int, history: list[StepRecord], *,
                     codec: Codec | None = None) -> list[HopSession]:
        """Open sessions covering [start, end) (speaking `codec`, if given) and replay `history` into
        them, retrying to the deadline."""
        attempt = 0
        while True:
            try:
                with trio.fail_at(self.deadline):
                    route = await self._plan(start, end)
                    return await self._open_and_replay(route, history, codec)
            except trio.TooSlowError as err:
                raise GenerationFailed(f"the request's deadline passed while covering blocks [{start}, {end})") from err
            except NoRouteError as err:
                failure: Exception = err
            except HopFailed as err:
                if err.retry is Retry.FATAL:
                    raise
                self._ban(err.peer_id, trio.current_time(), busy=err.busy)
                log.warning("%s while recovering; banned", err)
                failure = err
            delay = backoff_delay(attempt, self.rng)
            if trio.current_time() + delay >= self.deadline:
                if isinstance(failure, NoRouteError):
                    raise failure
                raise GenerationFailed(f"no working route for blocks [{start}, {end}) before the deadline; "
                                       f"last failure: {failure}") from failure
            await trio.sleep(delay)
            attempt += 1

    def _ban(self, peer_id: str, now: float, *, busy: bool) -> float:
        if not busy:
            self.failed.add(peer_id)
        return self.bans.ban(peer_id, now, busy=busy)

    async def _plan(self, start: int, end: int) -> Route:
        """A route avoiding banned peers and, while one exists without them, those that failed this request."""
        banned = self.bans.banned(trio.current_time())
        if not self.failed <= banned:
            try:
                return await self.plan(start, end, banned | self.failed)
            except NoRouteError:
                pass  # only peers that failed this request cover some blocks: they may have recovered
        return await self.plan(start, end, banned)

    async def _open_and_replay(self, route: Route, history: list[StepRecord], codec: Codec | None) -> list[HopSession]:
        hops: list[HopSession] = []
        try:
            for hop in route.hops:
                hops.append(await self.open_hop(hop.peer_id, hop.start, hop.end, codec))
            if history and all(hop.replays_chunks for hop in hops):
                await self._replay_at_once(hops, history)
            else:
                await self._replay_step_by_step(hops, history)
        except BaseException:
            with trio.CancelScope(shield=True):
                for hop in hops:
                    await hop.close()
            raise
        return hops

    async def _replay_at_once(self, hops: list[HopSession], history: list[StepRecord]) -> None:
        """One message per hop: the whole history, with the original steps' boundaries."""
        hidden = np.concatenate([record.hidden for record in history], axis=1)
        chunks = tuple(record.hidden.shape[1] for record in history)
        for hop in hops:
            hidden = await hop.step(hidden, history[0].start_position, replay=True, chunks=chunks,
                                    timeout=self._timeout(hidden.shape[1]))

    async def _replay_step_by_step(self, hops: list[HopSession], history: list[StepRecord]) -> None:
        for record in history:
            hidden = record.hidden
            for hop in hops:
                hidden = await hop.step(hidden, record.start_position, replay=True,
                                        timeout=self._timeout(hidden.shape[1]))

    def step_timeout(self, tokens: int) -> float:
        """How long a step of `tokens` positions may take: the timing's, within the request's deadline."""
        return self._timeout(tokens)

    def _timeout(self, tokens: int) -> float:
        remaining = self.deadline - trio.current_time()
        if remaining <= 0:
            raise GenerationFailed("the request's deadline passed")
        return min(self.timing.timeout(tokens), remaining)
