"""What remote peers may hold on a libp2p host: inbound connections per IP address, pending
handshakes, and streams per peer (issue 18, item 3).

py-libp2p 0.8.1 counts inbound connections with one `trio.CapacityLimiter` of
`max_connections - min_connections` slots, taken before the Noise handshake and, once a connection
is upgraded, given back only when the host shuts down (its handler task waits for the swarm's end):
with our household config, 64 idle TCP sockets, or 64 honest connections over a node's life,
refuse every new peer.
Its resource manager (`libp2p.rcmgr`) limits nothing per IP or per peer for TCP
(docs/libp2p.md, traps 15-18). So `InboundGuard` wraps the swarm's inbound handler:

- A connection is admitted before its handshake only while its IP has fewer than
  `max_pending_per_ip` handshakes pending and fewer than `max_connections_per_ip` connections in
  all, and the host fewer than `max_pending`; any other is closed at once, unread.
- A handshake must finish within `pending_timeout_s` (libp2p's inbound upgrade timeout is set to it).
- Once the connection closes, its handler task is ended, so libp2p's slot is given back.
- `open_stream` / `close_stream` count a peer's inbound streams of our protocols; the transport
  resets the ones past `max_streams_per_peer`.

The counting (`admit`, `established`, `release`, `open_stream`, `close_stream`) is plain code with
no I/O; `install` joins it to a swarm.
"""

from __future__ import annotations

import contextvars
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

log = logging.getLogger(__name__)

WATCH_POLL_S = 1.0  # how often a connection without a closing event is checked


@dataclass(frozen=True)
class InboundLimits:
    """Household defaults: a few devices per home, a home behind one address."""

    max_pending: int = 32  # inbound connections in their handshake, from everyone
    max_pending_per_ip: int = 8
    max_connections_per_ip: int = 16  # pending and established, from one address
    pending_timeout_s: float = 3.0  # a Noise + yamux handshake on loopback takes ~15-35 ms
    max_streams_per_peer: int = 64  # inbound streams of our protocols; a client holds <= 8 sessions + probes

    def __post_init__(self) -> None:
        for name in ("max_pending", "max_pending_per_ip", "max_connections_per_ip", "max_streams_per_peer"):
            if getattr(self, name) < 1:
                raise ValueError(f"InboundLimits.{name} must be at least 1, got {getattr(self, name)}")
        if not self.pending_timeout_s > 0:
            raise ValueError(f"InboundLimits.pending_timeout_s must be positive, got {self.pending_timeout_s}")


class _Slot:
    """One admitted inbound connection: its address, and its connection once upgraded."""

    def __init__(self, ip: str):
        self.ip = ip
        self.muxed: Any = None
        self.upgraded = trio.Event()


_SLOT: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar("hearth_inbound_slot", default=None)


class InboundGuard:
    def __init__(self, limits: InboundLimits | None = None):
        self.limits = limits or InboundLimits()
        self._pending: Counter[str] = Counter()  # IP -> connections in their handshake
        self._established: Counter[str] = Counter()  # IP -> upgraded inbound connections
        self._streams: Counter[str] = Counter()  # peer id -> inbound streams open
        self.refused_connections = 0
        self.refused_streams = 0

    # --- counting, no I/O -----------------------------------------------------------------

    def admit(self, ip: str) -> _Slot | None:
        """A slot for a new inbound connection from `ip`, or None (close it unread)."""
        limits, pending = self.limits, self._pending[ip]
        if sum(self._pending.values()) >= limits.max_pending or pending >= limits.max_pending_per_ip \
                or pending + self._established[ip] >= limits.max_connections_per_ip:
            self.refused_connections += 1
            log.debug("refused an inbound connection from %s: %d pending from it, %d established, %d pending in all",
                      ip, pending, self._established[ip], sum(self._pending.values()))
            return None
        self._pending[ip] += 1
        return _Slot(ip)

    def established(self, slot: _Slot, muxed: Any) -> None:
        """The connection of `slot` finished its handshake."""
        if slot.upgraded.is_set():
            return
        _decrement(self._pending, slot.ip)
        self._established[slot.ip] += 1
        slot.muxed = muxed
        slot.upgraded.set()

    def release(self, slot: _Slot) -> None:
        """The connection of `slot` is gone."""
        _decrement(self._established if slot.upgraded.is_set() else self._pending, slot.ip)

    def open_stream(self, peer_id: str) -> bool:
        """Count an inbound stream of `peer_id`; False (and not counted) past the limit."""
        if self._streams[peer_id] >= self.limits.max_streams_per_peer:
            self.refused_streams += 1
            return False
        self._streams[peer_id] += 1
        return True

    def close_stream(self, peer_id: str) -> None:
        _decrement(self._streams, peer_id)

    def statistics(self) -> dict[str, int]:
        return {"pending": sum(self._pending.values()), "established": sum(self._established.values()),
                "streams": sum(self._streams.values()), "refused_connections": self.refused_connections,
                "refused_streams": self.refused_streams}

    # --- joined to py-libp2p 0.8.1's swarm ------------------------------------------------

    def install(self, swarm: Any) -> None:
        """Wrap `swarm`'s inbound connection handler and inbound upgrade (instance attributes:
        the listener looks them up per connection), and bound its handshakes by `pending_timeout_s`."""
        handle, upgrade = swarm._handle_inbound_connection, swarm.upgrade_inbound_raw_conn
        swarm.connection_config.inbound_upgrade_timeout = self.limits.pending_timeout_s

        async def guarded_handle(read_write_closer: Any, maddr: Any) -> None:
            await self._handle(handle, read_write_closer, maddr)

        async def noted_upgrade(raw_conn: Any, maddr: Any) -> Any:
            muxed = await upgrade(raw_conn, maddr)
            slot = _SLOT.get()
            if slot is not None:
                self.established(slot, muxed)
            return muxed

        swarm._handle_inbound_connection = guarded_handle
        swarm.upgrade_inbound_raw_conn = noted_upgrade

    async def _handle(self, handle: Callable[[Any, Any], Awaitable[None]], read_write_closer: Any,
                      maddr: Any) -> None:
        slot = self.admit(_remote_ip(read_write_closer))
        if slot is None:
            with trio.move_on_after(1.0):
                try:
                    await read_write_closer.close()
                except Exception as err:  # the socket is going away anyway
                    log.debug("closing a refused connection: %r", err)
            return
        token = _SLOT.set(slot)  # libp2p's handler upgrades in this same task: `noted_upgrade` finds it
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch, slot, nursery.cancel_scope)
                await handle(read_write_closer, maddr)  # returns on a failure; else waits for the host's end
                nursery.cancel_scope.cancel()
        finally:
            _SLOT.reset(token)
            self.release(slot)

    async def _watch(self, slot: _Slot, handler_scope: trio.CancelScope) -> None:
        """End the handler once its connection has closed (libp2p's slot is then given back), or if
        its handshake outlives libp2p's own upgrade timeout (which fires first, and cleans up)."""
        with trio.move_on_after(self.limits.pending_timeout_s + 2.0):
            await slot.upgraded.wait()
        if slot.upgraded.is_set():
            await _wait_closed(slot.muxed)
        handler_scope.cancel()


async def _wait_closed(muxed: Any) -> None:
    """Until a libp2p muxed connection (yamux) has closed or begun shutting down."""
    shutting_down = getattr(muxed, "event_shutting_down", None)
    while not (getattr(muxed, "is_closed", False) or (shutting_down is not None and shutting_down.is_set())):
        with trio.move_on_after(WATCH_POLL_S):
            if isinstance(shutting_down, trio.Event):
                await shutting_down.wait()
            else:
                await trio.sleep_forever()


def _remote_ip(read_write_closer: Any) -> str:
    try:
        address = read_write_closer.get_remote_address()
    except Exception:  # not a socket (another transport): one shared bucket
        address = None
    return str(address[0]) if address else "?"


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
