"""The libp2p `Transport`: Noise-only, yamux-multiplexed TCP streams between peers.

`Libp2pTransport` owns one py-libp2p (0.8.1) host and works around its measured traps:

- Noise is the only security protocol offered (the default host also accepts plaintext).
- `ConnectionConfig(max_connections_per_peer=1)` avoids a 250 ms stall per connect; health
  monitoring (ping every 2 s, abort on failure) notices a silent peer within seconds.
- Every dial, stream opening, read and write is bounded by a trio timeout: a frozen peer
  otherwise holds a dial for ~120 s.
- Addresses we were given are re-added with a permanent TTL before each dial (libp2p's
  `connect` sets 120 s), and the 60 s negative dial cache is cleared for the peer we dial, so a
  peer that comes back can be redialled at once.
- Incoming streams run in the transport's nursery; a handler's exception is logged and resets
  that stream, never the host; a stream whose handler returns is closed (the peer reads EOF), and
  reset if the peer has not closed its side within `LINGER_S` (yamux would keep what it sends).
- Inbound connections per IP, pending handshakes and streams per peer are limited, and libp2p's
  inbound connection slots are given back when a connection closes: `mesh.inbound_guard`.
- libp2p's own cleanup, cancelled on exit, leaves the listener accepting: the host is closed
  explicitly. A listen address that cannot be bound raises `ListenError` (libp2p only logs it).
- The host announces concrete addresses (never the bound 0.0.0.0) and dials every address a
  peer has, not only the first: `mesh.libp2p_addressing`.

libp2p's own warnings and errors are re-emitted under `mesh.libp2p.*`, demoted (they are mostly a
peer going away, which our typed errors already report): its errors show at INFO, its warnings at
DEBUG. Set LIBP2P_DEBUG to get libp2p's own debug logging instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence

import multiaddr
import multihash
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import PERMANENT_ADDR_TTL
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from mesh import libp2p_addressing
from mesh.addresses import ip_of
from mesh.errors import DialError, StreamClosed, TransportError
from mesh.identity import load_or_create_identity
from mesh.inbound_guard import InboundGuard, InboundLimits
from mesh.libp2p_relay import Relaying
from mesh.peer_cache import PeerCache
from mesh.transport import ByteStream, PathKind, RelayLimits, StreamHandler, Transport, is_relayed_addr

log = logging.getLogger(__name__)

DEFAULT_LISTEN = ("/ip4/0.0.0.0/tcp/0",)
CLOSE_TIMEOUT_S = 2.0  # closing or resetting a stream, which may write a frame
LINGER_S, LINGER_BYTES = 2.0, 1 << 16  # a served stream the peer has not closed by then is reset
SHUTDOWN_TIMEOUT_S = 5.0
MDNS_POLL_S = 1.0
MDNS_RETRY_S = 30.0
MDNS_DIAL_TIMEOUT_S = 5.0


class ListenError(TransportError):
    """A listen address could not be bound."""


def household_connection_config() -> ConnectionConfig:
    """Limits for a few household devices, not a public swarm of hundreds."""
    return ConnectionConfig(
        max_connections_per_peer=1,  # more costs a 250 ms stall per connect
        enable_health_monitoring=True, health_initial_delay=1, health_check_interval=2, ping_timeout=2,
        abort_connection_on_ping_failure=True,
        health_warmup_window=1.0,  # default 5 s: a peer frozen just after connecting took ~9 s to notice, now ~5
        # libp2p auto-dials known peers toward (low + high) / 2 connections: 10 here, not ~200
        max_connections=64, min_connections=0, low_watermark=4, high_watermark=16,
        dial_timeout=10.0,
    )


class Libp2pByteStream(ByteStream):
    """A libp2p stream as a `ByteStream`: b"" at end of stream, `StreamClosed` on a reset."""

    def __init__(self, stream: INetStream, peer_id: str):
        self._stream, self.peer_id = stream, peer_id

    @property
    def local_host(self) -> str | None:
        """Our IP address on this stream's connection (the one the peer reached us on)."""
        ip = libp2p_addressing.local_ip(getattr(self._stream, "muxed_conn", None))
        return None if ip is None else str(ip)

    @property
    def remote_host(self) -> str | None:
        """The peer's IP address on this stream's connection."""
        ip = libp2p_addressing.local_ip(getattr(self._stream, "muxed_conn", None), remote=True)
        return None if ip is None else str(ip)

    async def send_all(self, data: bytes) -> None:
        try:
            await self._stream.write(bytes(data))
        except Exception as err:  # StreamClosed/StreamReset/raw connection errors alike
            raise StreamClosed(self.peer_id, f"write failed ({type(err).__name__})") from err

    async def receive_some(self, max_bytes: int) -> bytes:
        try:
            data = await self._stream.read(max_bytes)
        except StreamEOF as err:
            if self._connection_lost():
                raise StreamClosed(self.peer_id, "connection lost") from err
            return b""
        except StreamReset as err:
            raise StreamClosed(self.peer_id, "stream reset") from err
        except Exception as err:  # any other libp2p or socket error ends the stream
            raise StreamClosed(self.peer_id, f"read failed ({type(err).__name__})") from err
        if not data and self._connection_lost():
            raise StreamClosed(self.peer_id, "connection lost")
        return data

    async def aclose(self) -> None:
        """Close our side (the peer reads end of stream); never raises."""
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                await self._stream.close()
            except Exception as err:
                log.debug("closing stream to %s: %r", self.peer_id, err)

    async def reset(self) -> None:
        """Abort the stream both ways (the peer sees `StreamClosed`); never raises."""
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                await self._stream.reset()
            except Exception as err:
                log.debug("resetting stream to %s: %r", self.peer_id, err)

    def _connection_lost(self) -> bool:
        conn = getattr(self._stream, "muxed_conn", None)
        shutting_down = getattr(conn, "event_shutting_down", None)
        return bool(getattr(conn, "is_closed", False)) or (shutting_down is not None and shutting_down.is_set())


class Libp2pTransport(Transport):
    """One libp2p peer. Use as `async with Libp2pTransport(identity_path=..., listen=[...]) as t:`.

    identity_path: where the ed25519 key lives (created 0600 on first use); None = ephemeral.
    listen: multiaddrs to listen on (port 0 picks a free port; `addrs` shows the real one).
    enable_mdns: announce and discover peers on the LAN, and connect to those found.
    peer_cache: remembers the peers we reached, for rejoining without bootstrap hosts.
    inbound_limits: what remote peers may hold here (`mesh.inbound_guard`); household defaults.
    """

    def __init__(self, *, identity_path: os.PathLike | str | None = None, listen: Sequence[str] = DEFAULT_LISTEN,
                 enable_mdns: bool = False, peer_cache: PeerCache | None = None,
                 connection_config: ConnectionConfig | None = None, inbound_limits: InboundLimits | None = None):
        route_libp2p_logging()
        self.key_pair = load_or_create_identity(identity_path)
        self.listen = [_listen_addr(addr) for addr in listen]
        self.enable_mdns = enable_mdns
        self.peer_cache = peer_cache
        self.host: IHost = new_host(
            key_pair=self.key_pair,
            sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(
                self.key_pair, noise_privkey=create_x25519_key_pair().private_key)},
            muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
            connection_config=connection_config or household_connection_config(),
            listen_addrs=self.listen,
            enable_mDNS=enable_mdns,
            addrs_factory=libp2p_addressing.addrs_factory(),  # concrete addresses, the peer's own first
        )
        self._known: dict[str, list[multiaddr.Multiaddr]] = {}  # addresses we were given, per peer
        # and a dial that tries every address, not the first one, those we were given first
        libp2p_addressing.install(self.host, given=lambda peer: self._known.get(str(peer), []))
        # One quick retry: a refused dial should fail over fast, not back off for ~0.7 s.
        self.host.get_network().retry_config = RetryConfig(max_retries=1, initial_delay=0.1)
        self.guard = InboundGuard(inbound_limits)  # connections per IP, handshakes, streams per peer
        self.guard.install(self.host.get_network())
        self.relaying = Relaying(self.host)  # circuit relay v2 and hole punching (`mesh.libp2p_relay`)
        self.peer_id = str(self.host.get_id())
        self._nursery: trio.Nursery | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    async def __aenter__(self) -> Libp2pTransport:
        in_use = _ports_in_use(self.listen)  # libp2p's SO_REUSEPORT listeners would share them silently
        if in_use:
            raise ListenError(f"cannot listen on {', '.join(in_use)}: address in use")
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self.host.run(self.listen))
            failed = [str(a) for a in self.listen if str(a) not in self.host.get_network().listeners]
            if failed:  # libp2p only logs this; raised below, outside libp2p's nurseries
                await self._close_host()
            else:
                self._nursery = await stack.enter_async_context(trio.open_nursery())
                await self._nursery.start(self.relaying.run)
                if self.enable_mdns:
                    self._nursery.start_soon(self._connect_mdns_peers)
                self._stack = stack.pop_all()
        if failed:
            raise ListenError(f"cannot listen on {', '.join(failed)} (address in use, or not local?)")
        log.info("libp2p peer %s listening on %s", self.peer_id, " ".join(self.addrs))
        return self

    async def __aexit__(self, *exc_info) -> bool | None:
        if self.peer_cache is not None:
            self.peer_cache.save()
        self._nursery.cancel_scope.cancel()
        self._nursery = None
        await self._close_host()
        stack, self._stack = self._stack, None
        return await stack.__aexit__(*exc_info)

    async def _close_host(self) -> None:
        """Close explicitly: when `host.run` exits by cancellation, libp2p's own cleanup is
        cancelled too and leaves the listener accepting connections."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + SHUTDOWN_TIMEOUT_S
            try:
                await self.host.close()
            except Exception as err:
                log.warning("closing libp2p host %s: %s", self.peer_id, _describe(err))

    @property
    def addrs(self) -> list[str]:
        """What this host announces to everyone, ending in /p2p/<id>: wildcards become the interfaces
        that are up now, routable first; loopback only when there is nothing else
        (`mesh.libp2p_addressing`); then our addresses through the relays we hold a slot on."""
        return list(dict.fromkeys([*(str(addr) for addr in self.host.get_addrs()), *self.relaying.addrs()]))

    async def push_addrs(self) -> None:
        """Tell connected peers our addresses changed (libp2p's identify push); best effort, bounded."""
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                await self.host._push_identify_to_all_peers()  # 0.8.1 has no public name for it
            except Exception as err:
                log.debug("identify push failed: %r", err)

    async def dial(self, addr: str, *, timeout: float) -> str:
        peer, transport_addr = _parse_peer_addr(addr)
        if str(peer) == self.peer_id:
            raise DialError(addr, "that is this peer's own address")
        self._remember(str(peer), [transport_addr])
        await self._connect(peer, addr, timeout)
        return str(peer)

    async def open_stream(self, peer_id: str, protocol_id: str, *, timeout: float) -> ByteStream:
        peer = _parse_peer_id(peer_id)
        with trio.move_on_after(timeout):
            if not self._connected(peer):
                await self._connect(peer, peer_id, timeout)
            try:
                stream = await self.host.new_stream(peer, [TProtocol(protocol_id)])
            except Exception as err:  # StreamFailure, SwarmException, raw connection errors
                raise DialError(peer_id, f"cannot open {protocol_id}: {_describe(err)}") from err
            return Libp2pByteStream(stream, peer_id)
        raise DialError(peer_id, f"no {protocol_id} stream within {timeout:g} s")

    def set_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        async def on_stream(stream: INetStream) -> None:
            await self._hand_over(handler, protocol_id, stream)

        self.host.set_stream_handler(TProtocol(protocol_id), on_stream)

    def add_peer_addrs(self, peer_id: str, addrs: list[str]) -> None:
        try:
            peer = _parse_peer_id(peer_id)
        except DialError:
            log.debug("ignoring addresses of malformed peer id %r", peer_id)
            return
        parsed = []
        for addr in addrs:
            try:
                parsed.append(_strip_p2p(multiaddr.Multiaddr(addr), peer))
            except (ValueError, DialError) as err:
                log.debug("ignoring address %r of %s: %s", addr, peer_id, err)
        if parsed and str(peer) != self.peer_id:
            self._remember(str(peer), parsed)

    def connected_peers(self) -> list[str]:
        return [str(peer) for peer in self.host.get_connected_peers()]

    # --- NAT traversal (`mesh.libp2p_relay`) ---

    async def dial_back(self, addr: str, *, timeout: float) -> bool:
        """A plain TCP connection to `addr`'s IP address and port, on a new socket (never libp2p's
        connection to that peer): whether something listens there that we can reach."""
        if is_relayed_addr(addr):
            return False
        try:
            maddr = multiaddr.Multiaddr(addr)
            ip, port = ip_of(maddr), int(maddr.value_for_protocol("tcp"))
        except Exception:  # not an IP/TCP address: nothing we can dial back
            return False
        if ip is None:
            return False
        with trio.move_on_after(timeout):
            try:
                stream = await trio.open_tcp_stream(str(ip), port)
            except OSError:
                return False
            await stream.aclose()
            return True
        return False

    def offer_relay(self, limits: RelayLimits) -> None:
        self.relaying.offer(limits)

    async def reserve(self, relay_peer_id: str, *, timeout: float) -> list[str]:
        relay = _parse_peer_id(relay_peer_id)
        if not self._connected(relay):
            await self._connect(relay, relay_peer_id, timeout)
        known = [a for a in self._known.get(relay_peer_id) or _peerstore_addrs(self.host, relay)
                 if not is_relayed_addr(str(a))]
        # our relayed addresses are the relay's with /p2p-circuit: loopback ones only where all are
        routable = [a for a in known if not _is_loopback(a)] or known
        if not routable:
            raise DialError(relay_peer_id, "no known address of the relay to announce")
        return await self.relaying.reserve(relay_peer_id, routable, timeout=timeout)

    def release(self, relay_peer_id: str) -> None:
        self.relaying.release(relay_peer_id)

    def relays(self) -> list[str]:
        return self.relaying.relays()

    def path(self, peer_id: str) -> PathKind | None:
        try:
            return self.relaying.path(_parse_peer_id(peer_id))
        except DialError:
            return None

    async def upgrade(self, peer_id: str, *, timeout: float) -> bool:
        return await self.relaying.upgrade(_parse_peer_id(peer_id), timeout=timeout)

    def relay_of(self, peer_id: str) -> str | None:
        try:
            return self.relaying.relay_of(_parse_peer_id(peer_id))
        except DialError:
            return None

    async def _connect(self, peer: ID, target: str, timeout: float) -> None:
        """Connect to `peer` within `timeout` or raise DialError naming `target`."""
        network = self.host.get_network()
        network.unblock_peer(peer)  # drop the 60 s negative dial cache entry
        addrs = self._known.get(str(peer), [])
        peerstore = self.host.get_peerstore()
        if addrs:
            peerstore.add_addrs(peer, addrs, PERMANENT_ADDR_TTL)
        elif not _peerstore_addrs(self.host, peer):
            raise DialError(target, "no known address for this peer")
        with trio.move_on_after(timeout) as scope:
            try:
                await self.host.connect(PeerInfo(peer, addrs or _peerstore_addrs(self.host, peer)))
            except Exception as err:  # SwarmException and friends
                self.report_service(str(peer), ok=False)
                raise DialError(target, _describe(err)) from err
        if addrs:
            peerstore.add_addrs(peer, addrs, PERMANENT_ADDR_TTL)  # connect() set a 120 s TTL
        if scope.cancelled_caught:
            self.report_service(str(peer), ok=False)
            raise DialError(target, f"no connection within {timeout:g} s")
        if self.peer_cache is not None:
            reached = addrs or _peerstore_addrs(self.host, peer)
            self.peer_cache.remember(str(peer), [f"{a}/p2p/{peer}" for a in reached])

    def report_service(self, peer_id: str, *, ok: bool) -> None:
        """Credit or fault `peer_id` in the peer cache, if there is one (`mesh.peer_cache`); a peer
        that served over a connection it opened is cached at the addresses known for it."""
        if self.peer_cache is None:
            return
        if not ok:
            self.peer_cache.fault(peer_id)
            return
        try:
            peer = _parse_peer_id(peer_id)
        except DialError:
            return
        known = [str(a) for a in self._known.get(peer_id) or _peerstore_addrs(self.host, peer)]
        self.peer_cache.credit(peer_id, [a if a.endswith(f"/p2p/{peer}") else f"{a}/p2p/{peer}" for a in known])

    def _connected(self, peer: ID) -> bool:
        return any(not conn.is_closed for conn in self.host.get_network().get_connections(peer))

    def _remember(self, peer_id: str, addrs: list[multiaddr.Multiaddr]) -> None:
        """The newest addresses first (a peer that moved is dialled where it is now), at most
        MAX_DIAL_ADDRS of them per peer."""
        older = [a for a in self._known.get(peer_id, []) if a not in addrs]
        known = self._known[peer_id] = list(dict.fromkeys([*addrs, *older]))[:libp2p_addressing.MAX_DIAL_ADDRS]
        self.host.get_peerstore().add_addrs(ID.from_base58(peer_id), known, PERMANENT_ADDR_TTL)

    async def _hand_over(self, handler: StreamHandler, protocol_id: str, stream: INetStream) -> None:
        """Run the handler in our nursery; libp2p's task waits so the stream's accounting holds.
        A peer past its streams (`InboundLimits.max_streams_per_peer`) has the new one reset."""
        peer_id = str(stream.muxed_conn.peer_id)
        wrapped = Libp2pByteStream(stream, peer_id)
        if self._nursery is None or not self.guard.open_stream(peer_id):
            await wrapped.reset()
            return
        try:
            done = trio.Event()
            self._nursery.start_soon(self._run_handler, handler, protocol_id, wrapped, done)
            await done.wait()
        finally:
            self.guard.close_stream(peer_id)

    @staticmethod
    async def _run_handler(handler: StreamHandler, protocol_id: str, stream: Libp2pByteStream,
                           done: trio.Event) -> None:
        try:
            await handler(stream)
        except Exception:
            log.exception("handler for %s failed on a stream from %s", protocol_id, stream.peer_id)
            with trio.CancelScope(shield=True):
                await stream.reset()
        else:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            await _linger(stream)  # unshielded: a host that is closing drops its connections anyway
        finally:
            done.set()

    async def _connect_mdns_peers(self) -> None:
        """Connect to the LAN peers mDNS finds (it only fills the peerstore), and reconnect to
        them after a connection drops, trying each at most once per `MDNS_RETRY_S`."""
        next_try: dict[str, float] = {}
        while True:
            listener = getattr(self.host.mDNS, "listener", None)
            found = dict(getattr(listener, "discovered_services", None) or {})  # written by zeroconf's thread
            for peer, _seen in found.values():
                peer_id, now = str(peer), trio.current_time()
                if peer_id == self.peer_id or self._connected(peer) or now < next_try.get(peer_id, now):
                    continue
                next_try[peer_id] = now + MDNS_RETRY_S
                addrs = _peerstore_addrs(self.host, peer)
                if addrs:
                    self._remember(peer_id, addrs)
                    self._nursery.start_soon(self._dial_lan_peer, peer)
            await trio.sleep(MDNS_POLL_S)

    async def _dial_lan_peer(self, peer: ID) -> None:
        try:
            await self._connect(peer, f"LAN peer {peer}", MDNS_DIAL_TIMEOUT_S)
            log.info("connected to LAN peer %s found by mDNS", peer)
        except DialError as err:
            log.info("LAN peer found by mDNS is unreachable: %s", err)


async def _linger(stream: Libp2pByteStream) -> None:
    """After our side is closed, wait briefly for the peer to close its side, then reset: yamux keeps
    whatever a peer sends on a stream nobody reads until both sides have closed (and 60 s more)."""
    drained = 0
    with trio.move_on_after(LINGER_S):
        try:
            while drained <= LINGER_BYTES:
                data = await stream.receive_some(1 << 14)
                if not data:
                    return  # closed both ways
                drained += len(data)
        except StreamClosed:
            return
    await stream.reset()


def _parse_peer_id(peer_id: str) -> ID:
    try:
        peer = ID.from_base58(peer_id)
        multihash.decode(peer.to_bytes())  # from_base58 accepts any base58 text
    except Exception as err:  # base58 and multihash errors
        raise DialError(peer_id, f"not a peer id ({err})") from err
    return peer


def _parse_peer_addr(addr: str) -> tuple[ID, multiaddr.Multiaddr]:
    """The peer id and the transport part of `/.../p2p/<id>` (of a relayed address
    `<relay>/p2p/<relay id>/p2p-circuit/p2p/<id>`, the peer is the last id, the rest is the way)."""
    try:
        maddr = multiaddr.Multiaddr(addr)
    except Exception as err:  # multiaddr raises several error types
        raise DialError(addr, f"not a multiaddr ({err})") from err
    peer_text = _last_peer(maddr)
    if not peer_text:
        raise DialError(addr, "the address does not end in /p2p/<peer id>")
    peer = _parse_peer_id(peer_text)
    return peer, _strip_p2p(maddr, peer)


def _last_peer(maddr: multiaddr.Multiaddr) -> str | None:
    """The peer id the address ends in, if it ends in one (not a relay's id before /p2p-circuit)."""
    parts = str(maddr).rsplit("/p2p/", 1)
    return parts[1] if len(parts) == 2 and "/" not in parts[1] else None


def _strip_p2p(maddr: multiaddr.Multiaddr, peer: ID) -> multiaddr.Multiaddr:
    peer_text = _last_peer(maddr)
    if peer_text is None:
        return maddr
    if peer_text != str(peer):
        raise DialError(str(maddr), f"the address names peer {peer_text}, not {peer}")
    if is_relayed_addr(str(maddr)):
        return maddr  # the circuit transport reads the peer from the address itself
    return multiaddr.Multiaddr(str(maddr).rsplit("/p2p/", 1)[0])


def _listen_addr(addr: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(addr)
    except Exception as err:  # multiaddr raises several error types
        raise ListenError(f"cannot listen on {addr!r}: not a multiaddr like /ip4/0.0.0.0/tcp/4001 ({err})") from err


def _is_loopback(addr: multiaddr.Multiaddr) -> bool:
    ip = ip_of(addr)
    return ip is not None and ip.is_loopback


def _ports_in_use(listen: Sequence[multiaddr.Multiaddr]) -> list[str]:
    """Listen addresses with a fixed TCP port that another socket holds: bound here without
    SO_REUSEPORT, as libp2p's own listeners (which set it, for hole punching) would not notice."""
    import socket

    taken = []
    for addr in listen:
        ip = ip_of(addr)
        try:
            port = int(addr.value_for_protocol("tcp"))
        except Exception:  # no TCP part
            continue
        if ip is None or port == 0:
            continue
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
            try:
                probe.bind((str(ip), port))
            except OSError:
                taken.append(str(addr))
    return taken


def _peerstore_addrs(host: IHost, peer: ID) -> list[multiaddr.Multiaddr]:
    try:
        return list(host.get_peerstore().addrs(peer))
    except Exception:  # PeerStoreError: unknown or expired peer
        return []


def _describe(err: BaseException | None) -> str:
    """A one-line reason from a libp2p error and its causes."""
    parts = []
    while err is not None and len(parts) < 3:
        parts.append(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
        err = err.__cause__
    return "; ".join(parts)


# --- logging -------------------------------------------------------------------------------

# libp2p logs a peer going away (refused dial, reset stream) as an error, with a traceback.
_DEMOTED = {logging.CRITICAL: logging.WARNING, logging.ERROR: logging.INFO,
            logging.WARNING: logging.DEBUG, logging.INFO: logging.DEBUG}


class _Relay(logging.Handler):
    """Re-emits libp2p's records under `mesh.libp2p.<name>`, demoted (errors become INFO)."""

    def emit(self, record: logging.LogRecord) -> None:
        level = _DEMOTED.get(record.levelno, logging.DEBUG)
        target = logging.getLogger(f"mesh.libp2p.{record.name}")
        if target.isEnabledFor(level):
            relayed = logging.makeLogRecord(record.__dict__)
            relayed.levelno, relayed.levelname, relayed.name = level, logging.getLevelName(level), target.name
            target.handle(relayed)


def route_libp2p_logging() -> None:
    """Send libp2p's logging (which it points at stderr) through ours. Idempotent."""
    if os.environ.get("LIBP2P_DEBUG"):
        return  # the user asked for libp2p's own debug logging
    root = logging.getLogger("libp2p")
    if any(isinstance(h, _Relay) for h in root.handlers):
        return
    root.handlers.clear()
    root.addHandler(_Relay())
    root.propagate = False
    root.setLevel(logging.WARNING)  # its INFO and DEBUG calls sit on hot paths (one per stream)
