"""An in-memory `Transport` for tests and the simulator: peers in one process, in trio's clock.

A `MemoryNetwork` knows every peer. Streams are pairs of byte queues; a link model (latency and
bandwidth per direction, settable per pair of peers) delays delivery, and the network can cut
links (partitions), crash a peer (its streams reset, dials to it fail) or freeze it (its streams
go silent, as with a power cut: only timeouts notice).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import NamedTuple

import trio

from mesh.errors import DialError, StreamClosed
from mesh.transport import ByteStream, StreamHandler, Transport
from mesh.virtual_time import sleep_until

ADDR_PREFIX = "/memory/"
SEND_BUFFER_BYTES = 256 * 1024  # what a send may queue beyond the link before it blocks
log = logging.getLogger("hearth.mesh")


class Link(NamedTuple):  # a named tuple: a simulator builds one per message (its jitter)
    latency_s: float = 0.0  # one way
    bandwidth_bps: float = math.inf  # bits per second


class _Pipe:
    """One direction of a stream: chunks in flight with their delivery times, in order (as TCP's).

    Under a clock that can call back at a time (`mesh.virtual_time.VirtualClock`), a chunk is handed
    to the receiver when it arrives; under any other, at once with its arrival time, and the
    receiver waits for that time itself.
    """

    def __init__(self):
        self.send, self.recv = trio.open_memory_channel(math.inf)
        self.reset = False
        self.closed = False  # the sender closed its side
        self.last_arrival = 0.0
        self.in_flight = 0  # chunks handed to the clock, not yet arrived

    def put(self, arrival: float, data: bytes) -> None:
        arrival = self.last_arrival = max(arrival, self.last_arrival)
        call_at = getattr(trio.lowlevel.current_clock(), "call_at", None)
        if call_at is None:
            self.send.send_nowait((arrival, data))
            return
        self.in_flight += 1
        call_at(arrival, self._arrive, arrival, data)

    def _arrive(self, arrival: float, data: bytes) -> None:
        self.in_flight -= 1
        try:
            if not self.reset:
                self.send.send_nowait((arrival, data))
            if self.closed and not self.in_flight:
                self.send.close()  # the end of the stream arrives after its last chunk
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # reset, or the receiver is gone: the chunk is lost with the stream

    async def close(self) -> None:
        self.closed = True
        if self.in_flight:
            await trio.lowlevel.checkpoint()  # closed once the last chunk arrives
        else:
            await self.send.aclose()


class MemoryByteStream(ByteStream):
    def __init__(self, network: MemoryNetwork, local: str, peer_id: str, outgoing: _Pipe, incoming: _Pipe):
        self.network, self.local, self.peer_id = network, local, peer_id
        self._out, self._in = outgoing, incoming
        self._pending = b""
        self._next_free = 0.0  # when the outgoing link finishes sending what is queued

    async def send_all(self, data: bytes) -> None:
        if self._silent():
            await self._wait_while_frozen()
        if self._out.reset or self._out.closed or self.network.is_down(self.local) \
                or self.network.is_down(self.peer_id):
            raise StreamClosed(self.peer_id, "stream reset" if self._out.reset else "stream closed")
        link = self.network.link(self.local, self.peer_id)
        now = trio.current_time()
        transmit = len(data) * 8 / link.bandwidth_bps
        self._next_free = max(self._next_free, now) + transmit
        try:
            self._out.put(self._next_free + link.latency_s, bytes(data))
        except (trio.ClosedResourceError, trio.BrokenResourceError) as err:
            raise StreamClosed(self.peer_id, "stream closed") from err
        # Like a socket's send buffer: the write returns once the data is queued, unless more than
        # SEND_BUFFER_BYTES are still waiting for the uplink; then it waits until they fit.
        backlog_s = self._next_free - now - SEND_BUFFER_BYTES * 8 / link.bandwidth_bps
        if backlog_s > 0:
            await sleep_until(now + backlog_s)
        else:
            await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int) -> bytes:
        if not self._pending:
            try:
                arrival, self._pending = await self._in.recv.receive()
            except trio.EndOfChannel:
                if self._in.reset:
                    raise StreamClosed(self.peer_id, "stream reset") from None
                return b""
            except trio.ClosedResourceError:
                raise StreamClosed(self.peer_id, "stream closed locally") from None
            if arrival > trio.current_time():
                await sleep_until(arrival)
            if self._silent():
                await self._wait_while_frozen()
            if self._in.reset:
                raise StreamClosed(self.peer_id, "stream reset")
        data, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return data

    async def aclose(self) -> None:
        await self._out.close()

    @property
    def finished(self) -> bool:
        """Reset, or closed in both directions: nothing left for a crash to reset."""
        return self._out.reset or (self._out.closed and self._in.closed)

    def reset(self) -> None:
        self._out.reset = self._in.reset = True
        self._out.send.close()
        self._in.send.close()

    def _silent(self) -> bool:
        """Whether either end is frozen or the link between them cut: nothing gets through now."""
        network = self.network
        return network.is_frozen(self.local) or network.is_frozen(self.peer_id) or network.is_cut(self.local, self.peer_id)

    async def _wait_while_frozen(self) -> None:
        while self._silent():
            await trio.sleep(0.05)


class MemoryNetwork:
    """All in-memory peers of one test or simulation, and the links between them."""

    def __init__(self, default_link: Link = Link()):
        self.peers: dict[str, MemoryTransport] = {}
        self.default_link = default_link
        self.link_model: Callable[[str, str], Link] | None = None
        self._links: dict[tuple[str, str], Link] = {}
        self._down: set[str] = set()
        self._frozen: set[str] = set()
        self._cut: set[frozenset[str]] = set()
        self._streams: list[MemoryByteStream] = []
        self._prune_at = 64  # prune finished streams when the list grows past this (amortized O(1) per open)

    def link(self, src: str, dst: str) -> Link:
        if (src, dst) in self._links:
            return self._links[(src, dst)]
        return self.link_model(src, dst) if self.link_model else self.default_link

    def set_link(self, src: str, dst: str, link: Link) -> None:
        self._links[(src, dst)] = link

    def is_down(self, peer_id: str) -> bool:
        return peer_id in self._down

    def is_frozen(self, peer_id: str) -> bool:
        return peer_id in self._frozen

    def is_cut(self, a: str, b: str) -> bool:
        return bool(self._cut) and frozenset((a, b)) in self._cut

    def crash(self, peer_id: str) -> None:
        """The peer dies: its streams reset, dials to it fail until `restore`."""
        self._down.add(peer_id)
        for stream in [s for s in self._streams if peer_id in (s.local, s.peer_id)]:
            stream.reset()

    def freeze(self, peer_id: str) -> None:
        """The peer goes silent without closing anything (power cut, suspended laptop)."""
        self._frozen.add(peer_id)

    def open_streams(self) -> list[MemoryByteStream]:
        """Streams not finished yet, oldest first (both ends of each)."""
        return [s for s in self._streams if not s.finished]

    def reset_streams(self, a: str, b: str) -> int:
        """Reset every open stream between peers `a` and `b` (a dropped connection); returns how many."""
        hit = [s for s in self._streams if {s.local, s.peer_id} == {a, b} and not s.finished]
        for stream in hit:
            stream.reset()
        return len(hit)

    def cut(self, a: str, b: str) -> None:
        self._cut.add(frozenset((a, b)))

    def restore(self, peer_id: str | None = None, *, link: tuple[str, str] | None = None) -> None:
        if peer_id is not None:
            self._down.discard(peer_id)
            self._frozen.discard(peer_id)
        if link is not None:
            self._cut.discard(frozenset(link))

    def _open(self, src: MemoryTransport, dst_id: str, protocol_id: str) -> MemoryByteStream:
        dst = self.peers.get(dst_id)
        if dst is None or self.is_down(dst_id) or self.is_down(src.peer_id):
            raise DialError(dst_id, "peer unreachable")
        handler = dst.handlers.get(protocol_id)
        if handler is None:
            raise DialError(dst_id, f"protocol {protocol_id} not supported")
        forward, backward = _Pipe(), _Pipe()
        ours = MemoryByteStream(self, src.peer_id, dst_id, forward, backward)
        theirs = MemoryByteStream(self, dst_id, src.peer_id, backward, forward)
        self._streams += [ours, theirs]
        if len(self._streams) > self._prune_at:
            self._streams = [s for s in self._streams if not s.finished]
            self._prune_at = max(64, 2 * len(self._streams))
        dst.spawn(handler, theirs)
        return ours


class MemoryTransport(Transport):
    """One in-memory peer. Use as `async with MemoryTransport.open(network, peer_id) as transport:`."""

    def __init__(self, network: MemoryNetwork, peer_id: str, nursery: trio.Nursery):
        self.network, self.peer_id = network, peer_id
        self.handlers: dict[str, StreamHandler] = {}
        self.known: dict[str, list[str]] = {}
        self._nursery = nursery

    @classmethod
    @asynccontextmanager
    async def open(cls, network: MemoryNetwork, peer_id: str) -> AsyncIterator[MemoryTransport]:
        if peer_id in network.peers:
            raise ValueError(f"peer id {peer_id} is already on this network")
        async with trio.open_nursery() as nursery:
            transport = cls(network, peer_id, nursery)
            network.peers[peer_id] = transport
            try:
                yield transport
            finally:
                network.peers.pop(peer_id, None)
                network.crash(peer_id)
                network.restore(peer_id)
                nursery.cancel_scope.cancel()

    @property
    def addrs(self) -> list[str]:
        return [f"{ADDR_PREFIX}{self.peer_id}/p2p/{self.peer_id}"]

    async def dial(self, addr: str, *, timeout: float) -> str:
        peer_id = addr.rsplit("/p2p/", 1)[-1]
        if not addr.startswith(ADDR_PREFIX) or "/p2p/" not in addr:
            raise DialError(addr, "not a /memory/ address with a /p2p/ id")
        with trio.move_on_after(timeout):
            if self.network.is_frozen(peer_id):
                await trio.sleep_forever()
            if peer_id not in self.network.peers or self.network.is_down(peer_id):
                raise DialError(addr, "peer unreachable")
            self.known.setdefault(peer_id, [addr])
            return peer_id
        raise DialError(addr, f"no answer within {timeout:g} s")

    async def open_stream(self, peer_id: str, protocol_id: str, *, timeout: float) -> ByteStream:
        with trio.move_on_after(timeout):
            while self.network.is_frozen(peer_id) or self.network.is_cut(self.peer_id, peer_id):
                await trio.sleep(0.05)
            return self.network._open(self, peer_id, protocol_id)
        raise DialError(peer_id, f"no answer within {timeout:g} s")

    def set_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        self.handlers[protocol_id] = handler

    def add_peer_addrs(self, peer_id: str, addrs: list[str]) -> None:
        self.known[peer_id] = list(addrs)

    def spawn(self, handler: StreamHandler, stream: MemoryByteStream) -> None:
        self._nursery.start_soon(self._run_handler, handler, stream)

    @staticmethod
    async def _run_handler(handler: StreamHandler, stream: MemoryByteStream) -> None:
        """As libp2p does: a handler's exception resets its stream only; a handler that returns closes it."""
        try:
            await handler(stream)
        except Exception:
            log.exception("stream handler for %s failed", stream.peer_id)
            stream.reset()
        else:
            await stream.aclose()
