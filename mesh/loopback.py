"""A transport that can also open streams to its own peer: for a node that is its own client.

libp2p cannot dial the host it runs on, so a node that serves blocks and also runs a `Client`
(the node's OpenAI-compatible API) would never find its own span usable. `LoopbackTransport`
wraps the node's transport: streams to other peers go through it unchanged; a stream to this
peer's own id is an in-memory pair whose far end runs the handler registered for its protocol,
exactly as an incoming stream from the network would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mesh.memory_transport import LOOPBACK, MemoryNetwork, MemoryTransport
from mesh.transport import ByteStream, PathKind, RelayLimits, StreamHandler, Transport


class LoopbackTransport(Transport):
    """`inner` for every peer but this one; streams to this peer run its handlers in memory."""

    def __init__(self, inner: Transport, local: MemoryTransport):
        self.inner, self.local = inner, local
        self.peer_id = inner.peer_id

    @classmethod
    @asynccontextmanager
    async def wrap(cls, inner: Transport) -> AsyncIterator[LoopbackTransport]:
        """`async with LoopbackTransport.wrap(transport) as transport:`; loopback streams end with it."""
        async with MemoryTransport.open(MemoryNetwork(), inner.peer_id, listen=(LOOPBACK,)) as local:
            local.add_peer_addrs(local.peer_id, local.addrs)  # its own loopback address: reachable from itself
            yield cls(inner, local)

    @property
    def addrs(self) -> list[str]:
        return self.inner.addrs

    async def dial(self, addr: str, *, timeout: float) -> str:
        return await self.inner.dial(addr, timeout=timeout)

    async def open_stream(self, peer_id: str, protocol_id: str, *, timeout: float) -> ByteStream:
        if peer_id == self.peer_id:
            return await self.local.open_stream(peer_id, protocol_id, timeout=timeout)
        return await self.inner.open_stream(peer_id, protocol_id, timeout=timeout)

    def set_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        self.inner.set_handler(protocol_id, handler)
        self.local.set_handler(protocol_id, handler)

    def add_peer_addrs(self, peer_id: str, addrs: list[str]) -> None:
        self.inner.add_peer_addrs(peer_id, addrs)

    # NAT traversal is the network's business: the inner transport's (this peer is always direct)

    async def dial_back(self, addr: str, *, timeout: float) -> bool:
        return await self.inner.dial_back(addr, timeout=timeout)

    def offer_relay(self, limits: RelayLimits) -> None:
        self.inner.offer_relay(limits)

    async def reserve(self, relay_peer_id: str, *, timeout: float) -> list[str]:
        return await self.inner.reserve(relay_peer_id, timeout=timeout)

    def release(self, relay_peer_id: str) -> None:
        self.inner.release(relay_peer_id)

    def relays(self) -> list[str]:
        return self.inner.relays()

    def path(self, peer_id: str) -> PathKind | None:
        return PathKind.DIRECT if peer_id == self.peer_id else self.inner.path(peer_id)

    def connected_peers(self) -> list[str]:
        return self.inner.connected_peers()

    def relay_of(self, peer_id: str) -> str | None:
        return None if peer_id == self.peer_id else self.inner.relay_of(peer_id)

    async def upgrade(self, peer_id: str, *, timeout: float) -> bool:
        return peer_id == self.peer_id or await self.inner.upgrade(peer_id, timeout=timeout)

    def report_service(self, peer_id: str, *, ok: bool) -> None:
        self.inner.report_service(peer_id, ok=ok)
