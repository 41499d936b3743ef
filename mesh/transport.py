"""The transport seam: byte streams to peers by protocol id, and messages over them with timeouts.

A `Transport` (libp2p in `mesh.libp2p_transport`, in-memory in `mesh.memory_transport`) opens
`ByteStream`s to peers and hands incoming ones to the handler registered for their protocol.
Everything above it talks in protocol messages through a `MessageStream`: the sans-IO
`protocol.Connection` driven over a `ByteStream`, with every read and write bounded in time. The
protocol ids streams are opened with (`INFERENCE_PROTOCOL`, `INFO_PROTOCOL`) belong to
`protocol.conversation`; they are re-exported here for callers that name them with the transport.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from mesh.errors import DialError, StreamClosed, TransportError, TransportTimeout
from protocol import INFERENCE_PROTOCOL, INFO_PROTOCOL, Agreement, Connection, Message, Role

__all__ = ["ByteStream", "DEFAULT_IO_TIMEOUT_S", "INFERENCE_PROTOCOL", "INFO_PROTOCOL", "MessageStream",
           "PathKind", "RelayLimits", "StreamHandler", "Transport", "is_relayed_addr"]

DEFAULT_IO_TIMEOUT_S = 30.0
READ_CHUNK = 1 << 16


class ByteStream(abc.ABC):
    """An ordered, reliable byte pipe to one peer. Implementations raise `StreamClosed` on a reset."""

    peer_id: str
    local_host: str | None = None  # our IP address on the connection this stream runs over, if it has one
    remote_host: str | None = None  # the peer's IP address on that connection, if it has one

    @abc.abstractmethod
    async def send_all(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def receive_some(self, max_bytes: int) -> bytes:
        """Up to `max_bytes` bytes; b"" once the peer has closed its side."""

    @abc.abstractmethod
    async def aclose(self) -> None: ...


StreamHandler = Callable[[ByteStream], Awaitable[None]]

CIRCUIT = "/p2p-circuit"  # in an address: reach the peer after it through the relay before it


def is_relayed_addr(addr: str) -> bool:
    """`/.../p2p/<relay>/p2p-circuit/p2p/<peer>`: the peer is reached through a relay's slot."""
    return CIRCUIT in addr


class PathKind(enum.Enum):
    """How a new stream to a peer would travel now."""

    DIRECT = "direct"  # a connection of our own to the peer, dialled or accepted
    PUNCHED = "hole-punched"  # direct too, made through both ends' NATs after meeting at a relay
    RELAYED = "relayed"  # through a relay: it sees when and how much, never what (end-to-end encrypted)


@dataclass(frozen=True)
class RelayLimits:
    """What a relay grants (`Transport.offer_relay`): slots, connections through it, and how long and
    how much each may carry. Household defaults: a relay is someone's own machine and uplink."""

    max_reservations: int = 16  # peers holding a slot at once
    max_reservations_per_ip: int = 4  # of which behind one address (one home)
    reservation_ttl_s: float = 3600.0  # a slot lasts this long unless renewed
    max_circuits: int = 64  # relayed connections at once, in all
    max_circuits_per_peer: int = 16  # of which to or from one peer (a node behind NAT: about its sessions)
    max_circuit_s: float = 4 * 3600.0  # one relayed connection's lifetime
    max_circuit_bytes: int = 1 << 30  # and what it may carry, both ways together
    max_circuit_bytes_per_s: int = 4 << 20  # and how fast, each way (a household uplink is 1-5 MB/s)


class Transport(abc.ABC):
    """One peer's endpoint: its identity, its addresses, streams out and handlers for streams in."""

    peer_id: str

    @property
    @abc.abstractmethod
    def addrs(self) -> list[str]:
        """Addresses others can dial, each ending in this peer's id."""

    @abc.abstractmethod
    async def dial(self, addr: str, *, timeout: float) -> str:
        """Connect to the peer at `addr` (with its id in it); return its peer id. Raises DialError."""

    @abc.abstractmethod
    async def open_stream(self, peer_id: str, protocol_id: str, *, timeout: float) -> ByteStream:
        """A new stream to a known peer. Raises DialError."""

    @abc.abstractmethod
    def set_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        """Run `handler(stream)` in the transport's nursery for each incoming stream of `protocol_id`."""

    @abc.abstractmethod
    def add_peer_addrs(self, peer_id: str, addrs: list[str]) -> None:
        """Remember where a peer can be reached (from discovery)."""

    # --- NAT traversal (driven by `mesh.reachability`); a transport without it keeps these defaults ---

    async def dial_back(self, addr: str, *, timeout: float) -> bool:
        """Whether a new connection to `addr` comes up within `timeout`, never reusing one already
        open: what a peer asked to check our reachability does. Default: cannot tell (False)."""
        return False

    def offer_relay(self, limits: RelayLimits) -> None:
        """Relay for peers that cannot be reached directly, within `limits` (a reachable node's job)."""
        raise NotImplementedError(f"{type(self).__name__} cannot relay")

    async def reserve(self, relay_peer_id: str, *, timeout: float) -> list[str]:
        """Take a slot on a connected relay; its relayed addresses for us are in `addrs` from then
        on (until the relay goes away or `release`) and are returned. Raises DialError when the
        relay cannot be reached or refuses."""
        raise DialError(relay_peer_id, f"{type(self).__name__} cannot use relays")

    def release(self, relay_peer_id: str) -> None:
        """Give up our slot on a relay (its relayed addresses leave `addrs`)."""

    def relays(self) -> list[str]:
        """The relays we hold a slot on, whose addresses are in `addrs`."""
        return []

    def path(self, peer_id: str) -> PathKind | None:
        """How a new stream to `peer_id` would travel now; None when not connected."""
        return PathKind.DIRECT if peer_id in self.connected_peers() else None

    def connected_peers(self) -> list[str]:
        """Peers with a connection open now."""
        return []

    def relay_of(self, peer_id: str) -> str | None:
        """The relay a RELAYED path to `peer_id` runs through (who sees that traffic); else None."""
        return None

    async def upgrade(self, peer_id: str, *, timeout: float) -> bool:
        """Try to replace a relayed connection to `peer_id` by a direct one (hole punching, both ends
        taking part); True when new streams to it now travel directly."""
        return self.path(peer_id) in (PathKind.DIRECT, PathKind.PUNCHED)

    def report_service(self, peer_id: str, *, ok: bool) -> None:
        """How `peer_id` served us: `ok` for a generation it carried to the end, not `ok` for a hop
        on it that failed. A transport with a peer cache keeps the peers that served over newcomers
        (`mesh.peer_cache`); by default, nothing."""


class MessageStream:
    """Protocol messages over a `ByteStream`; each read and write is bounded by `io_timeout`.
    `bytes_sent` and `bytes_received` count what crossed the stream (a client times its link by them);
    `last_write_at` is when the last message's frame went to the byte stream, `last_read_at` when the
    byte stream last gave us bytes (trio's clock: both sides split a step's time with them)."""

    def __init__(self, raw: ByteStream, role: Role, *, io_timeout: float = DEFAULT_IO_TIMEOUT_S,
                 max_frame_bytes: int | None = None):
        self.raw = raw
        self.peer_id = raw.peer_id
        kwargs = {} if max_frame_bytes is None else {"max_frame_bytes": max_frame_bytes}
        self.connection = Connection(role, **kwargs)
        self.io_timeout = io_timeout
        self.bytes_sent = self.bytes_received = 0
        self.last_write_at = self.last_read_at = 0.0

    @property
    def agreement(self) -> Agreement | None:
        """What the Hellos on this stream agreed on, once both have passed."""
        return self.connection.agreement

    async def send(self, message: Message, *, timeout: float | None = None) -> None:
        seconds = self.io_timeout if timeout is None else timeout
        with trio.move_on_after(seconds):
            return await self.send_unbounded(message)
        raise TransportTimeout(self.peer_id, f"sending {type(message).__name__}", seconds)

    async def send_together(self, messages: list[Message], *, timeout: float | None = None) -> None:
        """Send `messages` in one write (one frame each), within one timeout."""
        seconds = self.io_timeout if timeout is None else timeout
        with trio.move_on_after(seconds):
            data = b"".join(self.connection.send(message) for message in messages)
            self.bytes_sent += len(data)
            self.last_write_at = trio.current_time()
            return await self.raw.send_all(data)
        raise TransportTimeout(self.peer_id, f"sending {len(messages)} messages", seconds)

    async def receive(self, *, timeout: float | None = None) -> Message:
        """The next message; raises StreamClosed at end of stream, TransportTimeout, or a ProtocolError."""
        seconds = self.io_timeout if timeout is None else timeout
        with trio.move_on_after(seconds):
            return await self.receive_unbounded()
        raise TransportTimeout(self.peer_id, "waiting for a message", seconds)

    async def request(self, message: Message, *, timeout: float | None = None) -> Message:
        """Send `message` and wait for the reply, both within `timeout`."""
        seconds = self.io_timeout if timeout is None else timeout
        with trio.move_on_after(seconds):  # one deadline for both: one cancel scope, not three
            await self.send_unbounded(message)
            return await self.receive_unbounded()
        raise TransportTimeout(self.peer_id, f"request {type(message).__name__}", seconds)

    async def send_unbounded(self, message: Message) -> None:
        """`send` without a timeout of its own: for a caller whose cancel scope has the deadline
        (a served session's loop moves one scope's deadline instead of entering a scope per message)."""
        data = self.connection.send(message)
        self.bytes_sent += len(data)
        self.last_write_at = trio.current_time()
        await self.raw.send_all(data)

    async def receive_unbounded(self) -> Message:
        """`receive` without a timeout of its own (see `send_unbounded`)."""
        while (message := self.connection.next_event()) is None:
            data = await self.raw.receive_some(READ_CHUNK)
            if not data:
                raise StreamClosed(self.peer_id)
            self.bytes_received += len(data)
            self.last_read_at = trio.current_time()
            self.connection.receive_data(data)
        return message

    def moved_to(self, raw: ByteStream) -> MessageStream:
        """This conversation, continued on another byte stream (a session's data channel): the
        protocol state and timeouts carry over. Nothing may be buffered unread."""
        moved = MessageStream(raw, self.connection.role, io_timeout=self.io_timeout)
        moved.peer_id, moved.connection = self.peer_id, self.connection
        return moved

    async def aclose(self) -> None:
        with trio.move_on_after(1.0):
            try:
                await self.raw.aclose()
            except TransportError:
                pass
