"""Discovery: who serves which blocks of which model, as records with an expiry.

A node announces a `PeerRecord` (its addresses and a `protocol.SpanInfo`) and refreshes it before
it expires; a client looks up the records of a model and ignores expired ones. Expiry is in wall
clock seconds (records cross machines), read from a clock passed in: the node passes the system
clock, tests and the simulator pass trio's. Implementations: `MemoryDirectory` (tests, simulator)
and the Kademlia DHT one in `mesh.dht`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import msgpack

from protocol import SpanInfo
from protocol.messages import message_from_wire

RECORD_TTL_S = 30.0  # a record outlives a dead node by at most this long
REFRESH_EVERY_S = 10.0


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
    """Records in a dict shared by every peer of one in-memory network (a perfect DHT)."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.records: dict[tuple[str, str], PeerRecord] = {}

    async def announce(self, record: PeerRecord) -> None:
        self.records[(record.info.manifest_hash, record.peer_id)] = record

    async def withdraw(self, peer_id: str, model_key: str) -> None:
        self.records.pop((model_key, peer_id), None)

    async def lookup(self, model_key: str) -> list[PeerRecord]:
        now = self.clock()
        expired = [key for key, record in self.records.items() if record.expired(now)]
        for key in expired:  # a crashed peer never withdraws: forget its record once it has expired
            del self.records[key]
        return sorted((r for (key, _), r in self.records.items() if key == model_key), key=lambda r: r.peer_id)
