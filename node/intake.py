"""What a node takes in from a peer before acting on it: how large a frame may be, and how many
bytes of unfinished frames may wait in its memory (issue 18, item 5).

- Until a session is open, and so its peer allowed, a frame is at most
  `IntakeLimits.small_frame_bytes` (Hello, OpenSession, Ping and Pong fit in far less); on info
  streams always. A peer announcing more is refused with FRAME_TOO_LARGE as soon as the 4 length
  bytes are in, before a byte of the body is kept. An open session's frames may be as large as the
  protocol allows (`protocol.DEFAULT_MAX_FRAME_BYTES`, what the node's Hello announces).
- Bytes received in frames not yet complete are reserved in a `BufferBudget`, per peer and in all,
  chunk by chunk as they arrive, on libp2p streams and data channels alike; a stream whose next
  chunk does not fit is refused with OVERLOADED (retry elsewhere) and closed, and its reservation
  given back at once.

The allow-list is checked before any of this (`node.server`): a peer not on it is refused before a
byte it sent is read.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import trio

from mesh.errors import StreamClosed
from mesh.transport import READ_CHUNK, ByteStream, MessageStream
from node.sessions import SessionRefused
from protocol import DEFAULT_MAX_FRAME_BYTES, ErrorCode, Message, Role


@dataclass(frozen=True)
class IntakeLimits:
    """Household defaults: one prompt's prefill frame fits a peer's share; a few fit in all."""

    small_frame_bytes: int = 64 << 10  # before a session is open, and on info streams
    max_buffered_bytes_per_peer: int = 80 << 20  # a whole 64 MiB frame and some
    max_buffered_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        for name in ("small_frame_bytes", "max_buffered_bytes_per_peer", "max_buffered_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"IntakeLimits.{name} must be at least 1, got {getattr(self, name)}")
        if self.small_frame_bytes > DEFAULT_MAX_FRAME_BYTES:
            raise ValueError(f"IntakeLimits.small_frame_bytes {self.small_frame_bytes} is over the protocol's "
                             f"frame limit {DEFAULT_MAX_FRAME_BYTES}")


class BufferFull(SessionRefused):
    """A peer's unfinished frames would take more memory than its share or the node's budget."""

    def __init__(self, peer_id: str, wanted: int, buffered: int, limit: int, scope: str):
        self.peer_id, self.wanted, self.buffered, self.limit = peer_id, wanted, buffered, limit
        super().__init__(ErrorCode.OVERLOADED,
                         f"{scope} {buffered} bytes of unfinished frames buffered here, {wanted} more would pass "
                         f"the limit of {limit}; retry elsewhere", retry_elsewhere=True)


class BufferBudget:
    """Bytes of unfinished frames held for each peer and in all, with limits on both. No I/O."""

    def __init__(self, per_peer: int, total: int):
        self.per_peer, self.total = per_peer, total
        self._by_peer: Counter[str] = Counter()
        self.buffered = 0
        self.high_water = 0  # the most ever held at once
        self.refused = 0

    def buffered_by(self, peer_id: str) -> int:
        return self._by_peer[peer_id]

    def reserve(self, peer_id: str, size: int) -> None:
        """Hold `size` more bytes for `peer_id`, or raise `BufferFull` (nothing held then)."""
        if self._by_peer[peer_id] + size > self.per_peer:
            self.refused += 1
            raise BufferFull(peer_id, size, self._by_peer[peer_id], self.per_peer, f"peer {peer_id} has")
        if self.buffered + size > self.total:
            self.refused += 1
            raise BufferFull(peer_id, size, self.buffered, self.total, "this node has")
        self._by_peer[peer_id] += size
        self.buffered += size
        self.high_water = max(self.high_water, self.buffered)

    def release(self, peer_id: str, size: int) -> None:
        size = min(size, self._by_peer[peer_id])
        self._by_peer[peer_id] -= size
        if self._by_peer[peer_id] <= 0:
            del self._by_peer[peer_id]
        self.buffered -= size

    def statistics(self) -> dict[str, int]:
        return {"buffered": self.buffered, "high_water": self.high_water, "peers": len(self._by_peer),
                "refused": self.refused}


class BudgetedStream(MessageStream):
    """A node's `MessageStream` whose unfinished frames are paid for from a `BufferBudget`, with the
    small frame limit until `allow_session_frames`."""

    def __init__(self, raw: ByteStream, role: Role, *, budget: BufferBudget, limits: IntakeLimits,
                 io_timeout: float):
        super().__init__(raw, role, io_timeout=io_timeout, max_frame_bytes=limits.small_frame_bytes)
        self.budget, self.limits = budget, limits
        self._held = 0  # reserved in `budget` for what the decoder holds

    def allow_session_frames(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        """The session is open and its peer allowed: frames up to the protocol's limit from now on."""
        self.connection.decoder.max_frame_bytes = max_frame_bytes

    async def receive_unbounded(self) -> Message:
        while True:
            try:
                message = self.connection.next_event()
            finally:
                self._settle()  # a complete frame leaves the decoder: its bytes are given back
            if message is not None:
                return message
            data = await self.raw.receive_some(READ_CHUNK)
            if not data:
                raise StreamClosed(self.peer_id)
            self.bytes_received += len(data)
            self.last_read_at = trio.current_time()
            try:
                self.budget.reserve(self.peer_id, len(data))
            except BufferFull:
                self.release_all()  # this stream is refused and closed: its share is free for others now
                raise
            self._held += len(data)
            self.connection.receive_data(data)

    def moved_to(self, raw: ByteStream) -> BudgetedStream:
        """This conversation on another byte stream (the data channel), paid from the same budget."""
        moved = BudgetedStream(raw, self.connection.role, budget=self.budget, limits=self.limits,
                               io_timeout=self.io_timeout)
        moved.peer_id, moved.connection = self.peer_id, self.connection
        moved._held, self._held = self._held, 0  # the decoder, and what it holds, go with it
        return moved

    def _settle(self) -> None:
        held = self.connection.decoder.buffered_bytes
        if held < self._held:
            self.budget.release(self.peer_id, self._held - held)
            self._held = held

    def release_all(self) -> None:
        """Give back the stream's whole reservation (it will not be read again)."""
        self.budget.release(self.peer_id, self._held)
        self._held = 0

    async def aclose(self) -> None:
        self.release_all()  # before any await: a cancelled close still gives the bytes back
        await super().aclose()
