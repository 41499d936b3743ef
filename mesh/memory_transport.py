"""An in-memory `Transport` for tests and the simulator: peers in one process, in trio's clock.

A `MemoryNetwork` knows every peer. Streams are pairs of byte queues; a link model (latency and
bandwidth per direction, settable per pair of peers) delays delivery, and the network can cut
links (partitions), crash a peer (its streams reset, dials to it fail) or freeze it (its streams
go silent, as with a power cut: only timeouts notice).

Peers are reached only through addresses, as on a real network (a node on a LAN once announced
its wildcard listen address, which no other host can dial, and the swarm never formed). A peer
lives on a host attached to one or more segments (a LAN, the internet; `DEFAULT_SEGMENT` unless
`MemoryNetwork.attach` says otherwise) and listens on some of them: `WILDCARD`, the default, is
every segment of its host plus `LOOPBACK`, expanded in `addrs` as the OS expands 0.0.0.0. An
address `/memory/<segment>/<host>/p2p/<peer id>` is reachable from peers on that segment; a
loopback address (and a wildcard one, which the OS dials as loopback) only from the same host. A
stream opens to a peer already connected (either of them dialed the other, or opened a stream to
it, since the last crash or reset between them: libp2p reuses the connection), or else through an
address known for it (`dial`, `add_peer_addrs`) that the dialer can reach; otherwise `DialError`
at once, as "no route to host" is.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import NamedTuple

import trio

from mesh.errors import DialError, StreamClosed
from mesh.transport import ByteStream, StreamHandler, Transport
from mesh.virtual_time import sleep_until

ADDR_PREFIX = "/memory/"
DEFAULT_SEGMENT = "shared"  # the segment of a peer never attached elsewhere: such peers all reach each other
LOOPBACK = "loopback"  # a host's own segment: reachable from peers on that host only
WILDCARD = "*"  # listen on every segment of the host and on loopback (0.0.0.0); dialled, it is loopback
SEND_BUFFER_BYTES = 256 * 1024  # what a send may queue beyond the link before it blocks
log = logging.getLogger("hearth.mesh")


class Attachment(NamedTuple):
    host: str  # peers on one host share its loopback
    segments: tuple[str, ...]  # the networks the host is on


def memory_addr(segment: str, host: str, peer_id: str) -> str:
    return f"{ADDR_PREFIX}{segment}/{host}/p2p/{peer_id}"


def parse_addr(addr: str) -> tuple[str, str, str] | None:
    """(segment, host, peer id) of `/memory/<segment>/<host>/p2p/<peer id>`; None for anything else."""
    parts = addr[len(ADDR_PREFIX):].split("/") if addr.startswith(ADDR_PREFIX) else []
    if len(parts) != 4 or parts[2] != "p2p" or not all(parts):
        return None
    return parts[0], parts[1], parts[3]


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
    """All in-memory peers of one test or simulation, the links between them, where each is attached
    and listens, and which of them are connected."""

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
        self._attachments: dict[str, Attachment] = {}
        self._listening: dict[str, frozenset[str]] = {}  # peer -> segments it accepts connections on
        self._connections: dict[str, set[str]] = {}  # open peer -> peers it is connected with (both ways)

    def attach(self, peer_id: str, segments: Iterable[str], *, host: str | None = None) -> None:
        """Put `peer_id` on `host` (its own by default) on `segments`, before it opens its transport."""
        segments = tuple(dict.fromkeys(segments))
        bad = [s for s in segments if s in (LOOPBACK, WILDCARD) or not s or "/" in s]
        if not segments or bad or (host is not None and (not host or "/" in host)):
            raise ValueError(f"peer {peer_id} needs segments other than {LOOPBACK!r} and {WILDCARD!r} and a host, "
                             f"without '/': got segments {list(segments)}, host {host!r}")
        if peer_id in self.peers:
            raise ValueError(f"peer {peer_id} is already open: attach it before opening its transport")
        self._attachments[peer_id] = Attachment(host or peer_id, segments)

    def attachment(self, peer_id: str) -> Attachment:
        return self._attachments.get(peer_id) or Attachment(peer_id, (DEFAULT_SEGMENT,))

    def listen(self, peer_id: str, listen: Sequence[str]) -> tuple[str, ...]:
        """Have `peer_id` accept connections on `listen` (its segments, `LOOPBACK`, `WILDCARD` for all
        of them); returns its addresses, the wildcard expanded."""
        at = self.attachment(peer_id)
        segments: list[str] = []
        for segment in listen:
            if segment == WILDCARD:
                segments += [*at.segments, LOOPBACK]
            elif segment == LOOPBACK or segment in at.segments:
                segments.append(segment)
            else:
                raise ValueError(f"peer {peer_id} cannot listen on {segment!r}: its host is on "
                                 f"{', '.join(at.segments)} (and {LOOPBACK})")
        segments = list(dict.fromkeys(segments))
        self._listening[peer_id] = frozenset(segments)
        return tuple(memory_addr(segment, at.host, peer_id) for segment in segments)

    def why_unreachable(self, src: str, addr: str) -> str | None:
        """Why `src` cannot reach `addr` (None when it can): a segment it is not on, another host's
        loopback, or a segment where the peer does not listen. A peer that is down is not this
        function's business: dials to it fail later, as a refused connection does."""
        parsed = parse_addr(addr)
        if parsed is None:
            return "not a /memory/<segment>/<host>/p2p/<peer id> address"
        segment, host, peer = parsed
        here, there = self.attachment(src), self.attachment(peer)
        if segment in (LOOPBACK, WILDCARD):  # 127.0.0.1 or 0.0.0.0: the dialer's own host
            if here.host != there.host:
                return f"a {segment} address leads to {src}'s own host, where {peer} is not"
            segment = LOOPBACK
        elif segment not in here.segments:
            return f"{src} is not on segment {segment} (it is on {', '.join(here.segments)})"
        elif host != there.host:
            return f"{peer} is not on host {host}"
        listening = self._listening.get(peer)
        if listening is not None and segment not in listening:
            return f"{peer} does not listen on {segment}"
        return None

    def check_route(self, src: MemoryTransport, dst_id: str) -> None:
        """DialError unless an address `src` knows for `dst_id` is reachable from it."""
        reasons = []
        for addr in src.known.get(dst_id, ()):
            why = self.why_unreachable(src.peer_id, addr) if addr.endswith(f"/p2p/{dst_id}") \
                else "an address of another peer"
            if why is None:
                return
            reasons.append(f"{addr}: {why}")
        raise DialError(dst_id, f"no reachable address from {src.peer_id} (known: {'; '.join(reasons) or 'none'})")

    def connect(self, a: str, b: str) -> None:
        """`a` and `b` now have a connection: either may open streams to the other over it."""
        self._connections.setdefault(a, set()).add(b)
        self._connections.setdefault(b, set()).add(a)

    def disconnect(self, a: str, b: str) -> None:
        self._connections.get(a, set()).discard(b)
        self._connections.get(b, set()).discard(a)

    def connections(self, peer_id: str) -> set[str]:
        """The peers `peer_id` has a connection with (the live set: the transport keeps it)."""
        return self._connections.setdefault(peer_id, set())

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
        for other in list(self._connections.get(peer_id, ())):
            self.disconnect(peer_id, other)

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
        self.disconnect(a, b)
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
        if dst_id not in src.connected:  # it may have dropped while `src` waited for a frozen peer
            self.check_route(src, dst_id)
            self.connect(src.peer_id, dst_id)
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

    def __init__(self, network: MemoryNetwork, peer_id: str, nursery: trio.Nursery, addrs: tuple[str, ...] = ()):
        self.network, self.peer_id = network, peer_id
        self.handlers: dict[str, StreamHandler] = {}
        self.known: dict[str, list[str]] = {}  # peer -> its addresses, as dialled or added
        self.connected = network.connections(peer_id)  # peers this one may open streams to at once
        self._addrs = addrs
        self._nursery = nursery

    @classmethod
    @asynccontextmanager
    async def open(cls, network: MemoryNetwork, peer_id: str, *,
                   listen: Sequence[str] = (WILDCARD,)) -> AsyncIterator[MemoryTransport]:
        """A peer listening on `listen`: segments of its host, `LOOPBACK`, or `WILDCARD` (all of them)."""
        if peer_id in network.peers:
            raise ValueError(f"peer id {peer_id} is already on this network")
        addrs = network.listen(peer_id, listen)
        async with trio.open_nursery() as nursery:
            transport = cls(network, peer_id, nursery, addrs)
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
        return list(self._addrs)

    async def dial(self, addr: str, *, timeout: float) -> str:
        why = self.network.why_unreachable(self.peer_id, addr)
        if why is not None:
            raise DialError(addr, why)
        peer_id = addr.rsplit("/p2p/", 1)[-1]
        with trio.move_on_after(timeout):
            if self.network.is_frozen(peer_id):
                await trio.sleep_forever()
            if peer_id not in self.network.peers or self.network.is_down(peer_id):
                raise DialError(addr, "peer unreachable")
            known = self.known.setdefault(peer_id, [])
            if addr not in known:
                known.append(addr)
            self.network.connect(self.peer_id, peer_id)
            return peer_id
        raise DialError(addr, f"no answer within {timeout:g} s")

    async def open_stream(self, peer_id: str, protocol_id: str, *, timeout: float) -> ByteStream:
        if peer_id not in self.connected:
            self.network.check_route(self, peer_id)  # no route to host: at once
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
