"""Slot hoarding and prefill rewinds (issue 18, item 4): one hostile host against honest nodes.

A `Hoarder` works on `hoard_targets` honest nodes at once, found in discovery, and replaces a
target it lost every `retarget` (+-50 %). On each it opens sessions through the real client code
(`mesh.session.open_hop`) with `max_length` 1, which reserve almost no KV cache, until it holds
`hoard_sessions` or the node refuses one (a node allows `max_sessions_per_peer`), and keeps each
alive with a 1-token step at position 0 every `keepalive` (+-10 %): idle in between, as in
`tests/adversarial/test_slot_hoarding.py`. Lost sessions (evicted for an honest client, expired,
the node gone) are reopened after each round. Beside them it rewinds one session of
`rewind_tokens` positions to position 0 with a whole prefill, step after step, as fast as the
node answers; the node's per-peer prefill budget refuses it in time (the session ends), and it
opens another 10 s later.

The defences under test are the node's: the per-peer session cap, eviction of idle sessions
(the hoarding peer's first), the per-peer prefill budget, and fair turns of the compute lock.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import trio

from mesh.discovery import PeerRecord
from mesh.session import HopFailed, HopSession, open_hop
from mesh.transport import Transport
from protocol import Codec

OPEN_TIMEOUT_S = 10.0
STEP_TIMEOUT_S = 60.0  # a rewind waits its turns of the compute lock behind everyone else's
REWIND_PAUSE_S = 10.0


def refusal_kind(reason: str) -> str:
    """What a node's refusal (or a lost session) was about, from its reason."""
    text = reason.lower()
    for needle, kind in (("sessions here", "per_peer"), ("slots", "slots"), ("kv cache", "kv_cache"),
                         ("evicted", "evicted"), ("prefill budget", "prefill_budget"), ("idle", "expired"),
                         ("shutting down", "draining"), ("timed out", "timeout"), ("no session within", "timeout"),
                         ("reset", "reset"), ("closed", "reset"), ("unreachable", "unreachable")):
        if needle in text:
            return kind
    return "other"


class Hoarder:
    def __init__(self, world, host, transport: Transport, hostile_ids: frozenset[str], counts: Counter[str]):
        self.world, self.host, self.transport = world, host, transport
        self.spec, self.rng = world.scenario.hostile, host.rng
        self.hostile_ids, self.counts = hostile_ids, counts
        self.hidden_size = world.model.config.hidden_size

    async def run(self) -> None:
        working: set[str] = set()
        async with trio.open_nursery() as nursery:
            while True:
                records = await self.world.directory.lookup(self.world.model.digest)
                free = [r for r in records if r.peer_id not in self.hostile_ids and r.peer_id not in working]
                for record in self.rng.sample(free, max(0, min(len(free), self.spec.hoard_targets - len(working)))):
                    working.add(record.peer_id)
                    nursery.start_soon(self._hoard, record, working)
                await trio.sleep(self.spec.retarget_s * (0.5 + self.rng.random()))

    async def _hoard(self, record: PeerRecord, working: set[str]) -> None:
        self.transport.add_peer_addrs(record.peer_id, list(record.addrs))
        try:
            async with trio.open_nursery() as nursery:
                if self.spec.rewind_tokens > 0:  # its session first: the idle ones fill the per-peer cap
                    await nursery.start(self._rewind, record)
                await self._keep(record)
                nursery.cancel_scope.cancel()
        finally:
            working.discard(record.peer_id)

    async def _open(self, record: PeerRecord, max_length: int) -> HopSession | None:
        """A session on the target's whole span, or None (counted, with the refusal's kind)."""
        info = record.info
        try:
            hop = await open_hop(self.transport, record.peer_id, info.start, info.end,
                                 model_id=self.world.model.model_id, manifest_hash=self.world.model.digest,
                                 max_length=max_length, batch=1, codec=Codec.FP32, timeout=OPEN_TIMEOUT_S,
                                 io_timeout=STEP_TIMEOUT_S, data_channel=False)
        except HopFailed as err:
            kind = refusal_kind(err.reason)
            self.counts[f"hoard_refused_{kind}"] += 1
            self.world.trace.record("hoard_refused", peer=self.host.peer_id, node=record.peer_id, why=kind)
            return None
        self.counts["hoard_opened"] += 1
        return hop

    async def _keep(self, record: PeerRecord) -> None:
        """Hold as many 1-position sessions as the node gives, a token each every `keepalive`;
        returns when the node gives none (gone, draining, or full)."""
        sessions: list[HopSession] = []
        try:
            while True:
                while len(sessions) < self.spec.hoard_sessions:
                    hop = await self._open(record, max_length=1)
                    if hop is None:
                        break
                    sessions.append(hop)
                if not sessions:
                    return
                await trio.sleep(self.spec.keepalive_s * (0.9 + 0.2 * self.rng.random()))
                for hop in list(sessions):
                    if not await self._step(hop, 1, "keepalive"):
                        sessions.remove(hop)
                        await hop.close()
        finally:
            with trio.CancelScope(shield=True):
                for hop in sessions:
                    await hop.close()

    async def _rewind(self, record: PeerRecord, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Prefill `rewind_tokens` at position 0, again and again, on one session at a time."""
        while True:
            hop = await self._open(record, max_length=self.spec.rewind_tokens)
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            try:
                while hop is not None and await self._step(hop, self.spec.rewind_tokens, "rewind"):
                    pass
            finally:
                if hop is not None:
                    with trio.CancelScope(shield=True):
                        await hop.close()
            await trio.sleep(REWIND_PAUSE_S * (0.5 + self.rng.random()))

    async def _step(self, hop: HopSession, tokens: int, what: str) -> bool:
        """`tokens` positions from position 0 (the session rewound); False once the session is lost."""
        hop.rewind(0)  # says so (Step.rewind: refused outright without it); the history keeps one step
        try:
            await hop.step(np.zeros((1, tokens, self.hidden_size), np.float32), 0, timeout=STEP_TIMEOUT_S)
        except HopFailed as err:
            kind = refusal_kind(err.reason)
            self.counts[f"{what}_lost_{kind}"] += 1
            self.world.trace.record(f"{what}_lost", peer=self.host.peer_id, node=hop.peer_id, why=kind)
            return False
        self.counts[f"{what}s"] += 1
        return True
