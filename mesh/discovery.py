"""Discovery: who serves which blocks of which model, as records with an expiry.

A node announces a `PeerRecord` (its addresses and a `protocol.SpanInfo`) and refreshes it before
it expires; a client looks up the records of a model and ignores expired ones. Expiry is in wall
clock seconds (records cross machines), read from a clock passed in: the node passes the system
clock, tests and the simulator pass trio's. Implementations: `MemoryDirectory` (tests, simulator)
and the Kademlia DHT one in `mesh.dht`; `SealedView` is one peer's way into a `MemoryDirectory`
that, like the DHT's sealed records, takes only that peer's own records.
"""

from __future__ import annotations

import abc
import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass

import msgpack

from protocol import SpanInfo
from protocol.messages import message_from_wire

RECORD_TTL_S = 30.0  # a record outlives a dead node by at most this long
REFRESH_EVERY_S = 10.0
MAX_AHEAD_S = RECORD_TTL_S + 30.0  # the furthest ahead a record may expire (mesh.dht.MAX_TTL_S: plus a clock allowance)


class InvalidRecord(ValueError):
    """A discovery record that does not parse or does not check out."""


@dataclass(frozen=True)
class PeerRecord:
    peer_id: str
    addrs: tuple[str, ...]
    info: SpanInfo
    expires_at: float  # wall-clock seconds

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    def to_bytes(self) -> bytes:
        return msgpack.packb({"peer_id": self.peer_id, "addrs": list(self.addrs), "info": self.info.to_wire(),
                              "expires_at": self.expires_at}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerRecord:
        try:
            raw = msgpack.unpackb(data, raw=False, max_bin_len=1 << 16, max_str_len=1 << 16,
                                  max_array_len=256, max_map_len=64)
            info = message_from_wire(raw["info"])
            record = cls(str(raw["peer_id"]), tuple(str(a) for a in raw["addrs"][:16]), info,
                         float(raw["expires_at"]))
        except Exception as err:  # any malformed input, whatever the library raises
            raise InvalidRecord(f"malformed peer record: {err!r}") from err
        if not isinstance(info, SpanInfo):
            raise InvalidRecord(f"peer record holds a {type(info).__name__}, not span info")
        return record


class Discovery(abc.ABC):
    @abc.abstractmethod
    async def announce(self, record: PeerRecord) -> None:
        """Publish (or refresh) this peer's record."""

    @abc.abstractmethod
    async def withdraw(self, peer_id: str, model_key: str) -> None:
        """Remove this peer's record for the model, as far as the mechanism allows."""

    @abc.abstractmethod
    async def lookup(self, model_key: str) -> list[PeerRecord]:
        """Unexpired records of peers serving the model whose manifest digest is `model_key`."""


class MemoryDirectory(Discovery):
    """Records in a dict shared by every peer of one in-memory network (a perfect DHT).

    A simulated swarm holds a thousand records and looks them up for every request, while nodes
    refresh theirs every few seconds and come and go: each model's records are also kept in a list
    in peer order, updated in place (a refresh replaces its entry, a newcomer is inserted, a
    withdrawn or expired record removed), so a lookup never sorts. Expired records are forgotten
    at most every `PRUNE_EVERY_S`; a lookup skips them in between.
    """

    PRUNE_EVERY_S = 1.0

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.records: dict[tuple[str, str], PeerRecord] = {}
        self._ordered: dict[str, list[PeerRecord]] = {}  # model key -> its records by peer id
        self._next_prune = -math.inf

    async def announce(self, record: PeerRecord) -> None:
        key = (record.info.manifest_hash, record.peer_id)
        ordered = self._ordered.setdefault(key[0], [])
        at = bisect.bisect_left(ordered, record.peer_id, key=_peer_id)
        if key in self.records:
            ordered[at] = record  # a refresh
        else:
            ordered.insert(at, record)
        self.records[key] = record

    async def withdraw(self, peer_id: str, model_key: str) -> None:
        if self.records.pop((model_key, peer_id), None) is not None:
            self._remove(model_key, peer_id)

    async def lookup(self, model_key: str) -> list[PeerRecord]:
        now = self.clock()
        if now >= self._next_prune:  # a crashed peer never withdraws: forget its record once it has expired
            self._next_prune = now + self.PRUNE_EVERY_S
            for key in [key for key, record in self.records.items() if record.expired(now)]:
                del self.records[key]
                self._remove(*key)
        return [r for r in self._ordered.get(model_key, ()) if now < r.expires_at]

    def _remove(self, model_key: str, peer_id: str) -> None:
        ordered = self._ordered[model_key]
        del ordered[bisect.bisect_left(ordered, peer_id, key=_peer_id)]


def _peer_id(record: PeerRecord) -> str:
    return record.peer_id


class SealedView(Discovery):
    """One peer's way into a shared directory (a `MemoryDirectory`) that takes what the sealed DHT
    takes (`mesh.sealed_record`, `mesh.dht.check_record`): only a key's owner can sign a record
    that verifies, and none may expire more than `max_ahead_s` ahead. Announcing a record of
    another peer, withdrawing another peer's, or announcing one that expires too far ahead raises
    `InvalidRecord`, as every honest DHT peer and client refuses such a value. Lookups pass through."""

    def __init__(self, directory: Discovery, peer_id: str, *, clock: Callable[[], float],
                 max_ahead_s: float = MAX_AHEAD_S):
        self.directory, self.peer_id, self.clock, self.max_ahead_s = directory, peer_id, clock, max_ahead_s

    def _check_author(self, peer_id: str) -> None:
        if peer_id != self.peer_id:
            raise InvalidRecord(f"record of peer {peer_id} signed by {self.peer_id}")

    async def announce(self, record: PeerRecord) -> None:
        self._check_author(record.peer_id)
        ahead = record.expires_at - self.clock()
        if not ahead <= self.max_ahead_s:  # NaN too
            raise InvalidRecord(f"record expires {ahead:.0f} s from now; the limit is {self.max_ahead_s:g} s")
        await self.directory.announce(record)

    async def withdraw(self, peer_id: str, model_key: str) -> None:
        self._check_author(peer_id)
        await self.directory.withdraw(peer_id, model_key)

    async def lookup(self, model_key: str) -> list[PeerRecord]:
        return await self.directory.lookup(model_key)
