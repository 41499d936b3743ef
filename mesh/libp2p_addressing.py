"""What a py-libp2p (0.8.1) host says its addresses are, and how it dials a peer's.

Two measured faults made a LAN of distinct hosts form no swarm when nodes listened on a wildcard
(/ip4/0.0.0.0/tcp/4001, the README's form): the host's identify answer and DHT provider records
gave the wildcard itself as its address, and a dial tries only the first TCP address the peerstore
holds for a peer (`Swarm.dial_peer` keeps "at most one address per transport class"), so a peer
known at 0.0.0.0 and at its LAN address was dialled at 0.0.0.0 only, and a host on two networks
only on the first. `addrs_factory` and `install(host)` replace both for one host:

- `addrs_factory` (libp2p's own hook for what a host advertises, given to `new_host`) turns the bound addresses into
  concrete ones, read from the interfaces at each call (so a changed address shows at once), and
  orders them for the peer asking: an identify answer (run with `reached_on` set for its
  connection) puts the address that peer reached us on first and shows loopback only to a
  loopback peer; everything else (DHT records, identify pushes) gets the routable addresses.
- mDNS announces those concrete addresses too (it announced the bound 0.0.0.0, which a peer on
  the same machine can dial and one on another cannot).
- `dial_peer` dials every address the peerstore holds, best first (`mesh.addresses.dial_order`),
  starting the next after `STAGGER_S` or as soon as one fails (happy eyeballs), and keeps the
  first connection that comes up.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Sequence

import multiaddr
import trio
from libp2p.abc import IHost, INetConn
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID

from mesh.addresses import Interface, IpAddress, concrete, dial_order, local_interfaces, offered

log = logging.getLogger(__name__)

STAGGER_S = 0.25  # go-libp2p's and py-libp2p's happy-eyeballs delay between addresses
MAX_DIAL_ADDRS = 8  # a peer's addresses tried per dial: what a hostile peer's list can make us dial

# The local IP of the connection whose identify answer is being built (None: no particular peer).
reached_on: contextvars.ContextVar[IpAddress | None] = contextvars.ContextVar("reached_on", default=None)


def addrs_factory(interfaces: Callable[[], Sequence[Interface]] = local_interfaces
                  ) -> Callable[[list[multiaddr.Multiaddr]], list[multiaddr.Multiaddr]]:
    """libp2p's `AddrsFactory` hook (`new_host(addrs_factory=...)`): what the host advertises."""
    return lambda candidates: offered(concrete(candidates, interfaces()), reached_on.get())


def install(host: IHost, given: Callable[[ID], Sequence[multiaddr.Multiaddr]],
            interfaces: Callable[[], Sequence[Interface]] = local_interfaces) -> None:
    """Give `host` (made with `addrs_factory`) per-peer identify answers and a dial that tries every
    address, those `given(peer)` returns (what we were told by the user or the peer's record) first."""
    network = host.get_network()
    dialing: dict[ID, trio.Event] = {}

    async def dial_peer(peer_id: ID) -> list[INetConn]:
        return await _dial_peer(network, peer_id, interfaces(), given(peer_id), dialing)

    network.dial_peer = dial_peer
    broadcaster = getattr(getattr(host, "mDNS", None), "broadcaster", None)
    if broadcaster is not None:  # it would put the raw bound addresses (0.0.0.0) in its TXT records
        broadcaster.host = _ConcreteAddrs(host, interfaces)
    identify = host.get_mux().handlers.get(IDENTIFY_PROTOCOL)
    if identify is not None:
        async def identify_for_this_peer(stream) -> None:
            token = reached_on.set(local_ip(stream.muxed_conn))
            try:
                await identify(stream)
            finally:
                reached_on.reset(token)

        host.set_stream_handler(IDENTIFY_PROTOCOL, identify_for_this_peer)


class _ConcreteAddrs:
    """What the mDNS broadcaster reads of its host: the addresses offered to everyone on the LAN."""

    def __init__(self, host: IHost, interfaces: Callable[[], Sequence[Interface]]):
        self._host, self._interfaces = host, interfaces

    def get_transport_addrs(self) -> list[multiaddr.Multiaddr]:
        return offered(concrete(self._host.get_transport_addrs(), self._interfaces()))


def local_ip(conn, *, remote: bool = False) -> IpAddress | None:
    """The local (or, `remote`, the peer's) IP address of a libp2p connection (yamux over Noise
    over TCP); None if unknown."""
    import ipaddress

    node = conn
    for _ in range(10):  # Yamux -> SecureSession -> Noise read-writer -> RawConnection -> TCP -> socket
        sock = getattr(node, "socket", None)
        if sock is not None and hasattr(sock, "getsockname"):
            try:
                name = sock.getpeername() if remote else sock.getsockname()
                return ipaddress.ip_address(name[0].split("%")[0])
            except (OSError, ValueError, IndexError):
                return None
        node = next((getattr(node, a) for a in ("secured_conn", "conn", "read_writer", "stream")
                     if getattr(node, a, None) is not None), None)
        if node is None:
            return None
    return None


async def _dial_peer(network, peer_id: ID, interfaces: Sequence[Interface], given: Sequence[multiaddr.Multiaddr],
                     dialing: dict[ID, trio.Event]) -> list[INetConn]:
    """Swarm.dial_peer over every dialable address: an open connection, else the first that comes up."""
    for _ in range(2):
        live = [c for c in network.get_connections(peer_id) if not c.is_closed]
        if live:
            return live
        if peer_id not in dialing:
            break
        await dialing[peer_id].wait()  # one dial per peer at a time; then use what it made
    try:
        known = network.peerstore.addrs(peer_id)
    except Exception as err:  # PeerStoreError: never heard of it, or its addresses expired
        if not given:
            raise SwarmException(f"no known address for peer {peer_id}") from err
        known = []
    addrs = dial_order(known, interfaces, given)[:MAX_DIAL_ADDRS]
    if not addrs:
        raise SwarmException(f"no dialable address for peer {peer_id} (known: {', '.join(map(str, known)) or 'none'})")
    failed_lately = getattr(network, "_negative_peer_cache", None)  # libp2p's: a peer that failed waits 60 s
    if failed_lately is not None and failed_lately.is_blocked(str(peer_id)):  # (our own dials clear it first)
        raise SwarmException(f"peer {peer_id} recently failed all addresses")
    done = dialing[peer_id] = trio.Event()
    try:
        conn = await _first_connection(network, peer_id, addrs)
    except SwarmException:
        if failed_lately is not None:
            failed_lately.mark_failed(str(peer_id))
        raise
    finally:
        dialing.pop(peer_id, None)
        done.set()
    if failed_lately is not None:
        failed_lately.evict(str(peer_id))
    return [conn]


async def _first_connection(network, peer_id: ID, addrs: list[multiaddr.Multiaddr]) -> INetConn:
    won: list[INetConn] = []
    failures: list[str] = []

    async def attempt(addr: multiaddr.Multiaddr, failed: trio.Event, scope: trio.CancelScope) -> None:
        try:
            conn = await network.dial_addr(addr, peer_id)
        except Exception as err:  # SwarmException, OSError and friends: this address does not work
            failures.append(f"{addr}: {type(err).__name__}: {err}")
            failed.set()
            return
        if won:  # another address won in the meantime
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                await conn.close()
            return
        won.append(conn)
        scope.cancel()

    async with trio.open_nursery() as nursery:
        for addr in addrs:
            failed = trio.Event()
            nursery.start_soon(attempt, addr, failed, nursery.cancel_scope)
            with trio.move_on_after(STAGGER_S):
                await failed.wait()
    if not won:
        raise SwarmException(f"unable to connect to {peer_id}: " + "; ".join(failures))
    log.debug("connected to %s at %s", peer_id, won[0])
    return won[0]
