"""Streams of the in-memory transport: byte pipes whose chunks arrive when a link model says.

A `MemoryByteStream` is one end of a stream between two peers of a `mesh.memory_transport.MemoryNetwork`:
its writes go into a `_Pipe` with their arrival times (the link's latency plus the time the bytes
take at its bandwidth), its reads take them out when they have arrived. The network decides the
link (direct, or both legs of a relay's circuit), whether anything gets through now (a frozen
peer or relay, a cut link: the stream stalls, as a dead TCP path does) and resets streams when a
peer, a connection or a circuit goes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import trio

from mesh.errors import StreamClosed
from mesh.transport import ByteStream
from mesh.virtual_time import sleep_until

if TYPE_CHECKING:
    from mesh.memory_relay import Circuit

SEND_BUFFER_BYTES = 256 * 1024  # what a send may queue beyond the link before it blocks


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
    """One end of a stream from `local` to `peer_id`, directly or over a relay's `circuit`; `network`
    is their `mesh.memory_transport.MemoryNetwork`."""

    def __init__(self, network, local: str, peer_id: str, outgoing: _Pipe, incoming: _Pipe,
                 circuit: Circuit | None = None):
        self.network, self.local, self.peer_id = network, local, peer_id
        self.circuit = circuit
        self._out, self._in = outgoing, incoming
        self._pending = b""
        self._next_free = 0.0  # when the outgoing link finishes sending what is queued

    async def send_all(self, data: bytes) -> None:
        if self._silent():
            await self._wait_while_frozen()
        if self._out.reset or self._out.closed or self.network.is_down(self.local) \
                or self.network.is_down(self.peer_id):
            raise StreamClosed(self.peer_id, "stream reset" if self._out.reset else "stream closed")
        if self.circuit is None:
            link = self.network.link(self.local, self.peer_id)
        else:
            link = self.network.circuit_link(self.local, self.peer_id, self.circuit, len(data))
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
        """Whether nothing gets through now: either end frozen, or the link between them cut (over a
        circuit: the relay frozen or either leg cut)."""
        return self.network.stalled(self.local, self.peer_id, None if self.circuit is None else self.circuit.relay)

    async def _wait_while_frozen(self) -> None:
        while self._silent():
            await trio.sleep(0.05)
