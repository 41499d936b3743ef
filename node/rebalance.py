"""Rebalancing: a node that chose its own span re-evaluates it now and then and moves where the
swarm is weakest (`mesh.balance` decides; this module asks it, at randomised times, and moves).

Every `every_s` (give or take `jitter` of it, from the node's seeded rng, so that nodes do not all
look at once and all pile into the same gap) the node reads what discovery says is served and
asks `choose_move`. A move loads the new span first, announces it, and only then lets go of the
old one (`Node.move_to`). After a move the node stays put for `settle_s` at least: with the
threshold in `choose_move`, that is the hysteresis that keeps nodes from oscillating.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from mesh.balance import DEFAULT_THRESHOLD, Served, choose_move
from mesh.discovery import PeerRecord

log = logging.getLogger("hearth.node")


@dataclass(frozen=True)
class BalanceSettings:
    n_blocks: int  # blocks of the model
    max_blocks: int  # blocks this node's memory holds
    block_seconds: float  # this node's seconds per block per decoded token
    every_s: float = 120.0  # how often the node re-evaluates its span
    jitter: float = 0.5  # each wait is every_s x (1 +- jitter), drawn at random
    threshold: float = DEFAULT_THRESHOLD  # the bottleneck gain a move must bring (mesh.balance)
    settle_s: float = 300.0  # after a move, no other for this long
    grace_s: float = 60.0  # sessions on the old span may finish for this long after a move
    lookup_timeout_s: float = 10.0

    def __post_init__(self):
        if not (self.n_blocks >= 1 and 1 <= self.max_blocks):
            raise ValueError(f"need n_blocks >= 1 and max_blocks >= 1, got {self.n_blocks}, {self.max_blocks}")
        if not (self.block_seconds > 0 and math.isfinite(self.block_seconds)):
            raise ValueError(f"block_seconds must be a positive number, got {self.block_seconds}")
        if not (self.every_s > 0 and 0 <= self.jitter < 1):
            raise ValueError(f"need every_s > 0 and 0 <= jitter < 1, got {self.every_s}, {self.jitter}")


def served_from(records: list[PeerRecord], manifest_hash: str) -> list[Served]:
    return [Served(r.peer_id, r.info.start, r.info.end, r.info.throughput)
            for r in records if r.info.manifest_hash == manifest_hash]


class Rebalancer:
    """Runs beside a `Node` (in its nursery) and moves it when `choose_move` says so."""

    def __init__(self, node, settings: BalanceSettings, rng: random.Random,
                 move: Callable[[int, int], Awaitable[None]]):
        self.node, self.settings, self.rng, self.move = node, settings, rng, move
        self.moves = 0
        self.failed_moves = 0

    def next_wait(self) -> float:
        s = self.settings
        return s.every_s * (1 + s.jitter * (2 * self.rng.random() - 1))

    async def run(self) -> None:
        last_move = -math.inf
        while True:
            await trio.sleep(self.next_wait())
            if trio.current_time() - last_move < self.settings.settle_s:
                continue
            target = await self.evaluate()
            if target is not None:
                log.info("moving from blocks [%d, %d) to [%d, %d)", self.node.span.start, self.node.span.end, *target)
                try:
                    await self.move(*target)
                except Exception:  # e.g. the new blocks do not fit after all: keep serving the old ones
                    log.exception("could not move to blocks [%d, %d); staying", *target)
                    self.failed_moves += 1
                else:
                    self.moves += 1
                last_move = trio.current_time()

    async def evaluate(self) -> tuple[int, int] | None:
        """Where this node should move now, or None (also when discovery does not answer in time)."""
        node, s = self.node, self.settings
        with trio.move_on_after(s.lookup_timeout_s):
            try:
                records = await node.discovery.lookup(node.manifest_hash)
            except (OSError, RuntimeError) as err:
                log.warning("lookup for rebalancing failed: %r", err)
                return None
            me = node.transport.peer_id
            served = [server for server in served_from(records, node.manifest_hash) if server.peer_id != me]
            served.append(Served(me, node.span.start, node.span.end, 1 / ((node.span.end - node.span.start) * s.block_seconds)))
            return choose_move(served, me, s.n_blocks, block_seconds=s.block_seconds, max_blocks=s.max_blocks,
                               threshold=s.threshold, rng=self.rng)
        log.warning("lookup for rebalancing timed out after %g s", s.lookup_timeout_s)
        return None
