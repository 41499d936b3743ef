"""Relays and hole punching for one py-libp2p (0.8.1) host: circuit relay v2 and DCUtR, made usable.

`Relaying` gives `Libp2pTransport` the NAT-traversal half of the `Transport` seam. What 0.8.1
ships works once these measured traps are worked around:

- Dialling `<relay addr>/p2p/<relay>/p2p-circuit/p2p/<peer>` through the swarm fails: the TCP
  transport sorts first and claims the address (it dials the relay, Noise then finds the wrong peer
  id and the swarm forgets the peer's addresses), and the circuit transport's `dial` returns an
  upgraded connection where the swarm wants a raw one. `_CircuitDial` sorts before TCP and hands
  the swarm the raw relayed stream, which the swarm secures with Noise end to end: the relay
  forwards ciphertext of the two end peers.
- A relay took a reservation in the name of whatever peer id the request carried, so any peer
  could use up the slots in others' names: `_HouseholdRelay` reserves for the connection's
  authenticated peer only, and adds the limits 0.8.1 leaves unenforced (reservations per IP
  address, relayed connections in all and per peer, bytes per second each way).
- The library's reservation refresher spins when a refresh fails; reservations are renewed by
  the caller instead (`mesh.reachability.ReachKeeper` re-reserves what `relays()` no longer lists,
  `RENEW_BEFORE_S` ahead of expiry or as soon as the relay's connection drops).
- The relay-client role left at its default also reserved a slot on every relay it dialled
  through: only the stop role (accepting relayed connections) is enabled.
- DCUtR runs by itself: every 2 s it tries to upgrade each peer we hold a relayed connection to,
  first by dialling its addresses (for up to 10 s in 0.8.1, spent in full on a peer behind NAT,
  whose private addresses never answer: `_PromptDCUtR` gives that `UNILATERAL_DIAL_S`, since our own
  dial tried them already before it took the relay), then by the CONNECT/SYNC exchange in which both ends dial each
  other's observed address from their listen port (SO_REUSEPORT), which is how TCP gets through two
  port-preserving NATs. `upgrade` starts an attempt at once and waits for it. A direct connection
  is preferred for new streams by the swarm; streams already on the relayed connection stay there
  until it closes (DCUtR closes it 60 s after a successful punch).
"""

from __future__ import annotations

import logging
import time
import weakref

import multiaddr
import trio
from libp2p.abc import IHost, IListener, ITransport
from libp2p.connection_types import ConnectionType
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits as Libp2pRelayLimits
from libp2p.relay.circuit_v2.resources import RelayResourceManager
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from multiaddr.protocols import P_P2P, P_P2P_CIRCUIT

from mesh.errors import DialError
from mesh.transport import CIRCUIT, PathKind, RelayLimits

log = logging.getLogger(__name__)

RENEW_BEFORE_S = 120.0  # a reservation this close to expiry is no longer listed: the keeper renews it
UNILATERAL_DIAL_S = 1.0  # DCUtR's plain dial of a relayed peer's own addresses, before the punch


def is_relayed(conn) -> bool:
    """Whether a swarm connection runs through a relay."""
    try:
        if conn.get_connection_type() == ConnectionType.RELAYED:
            return True
    except Exception:  # a connection type 0.8.1 could not tell
        pass
    try:
        return any(CIRCUIT in str(addr) for addr in conn.get_transport_addresses())
    except Exception:
        return False


class _CircuitDial(ITransport):
    """Lets the swarm dial circuit addresses (see the module docstring)."""

    def __init__(self, circuit: CircuitV2Transport):
        self.circuit = circuit

    def listen_order(self) -> int:
        return -1  # before TCP, which would claim the address otherwise

    def protocols(self) -> list[str]:
        return ["p2p-circuit"]

    def can_dial(self, maddr: multiaddr.Multiaddr) -> bool:
        return any(p.code == P_P2P_CIRCUIT for p in maddr.protocols())

    def can_listen(self, maddr: multiaddr.Multiaddr) -> bool:
        return False

    def create_listener(self, handler_function) -> IListener:
        raise NotImplementedError("relayed connections arrive on the stop protocol")

    async def dial(self, maddr: multiaddr.Multiaddr):
        relay_addr, target = self.circuit.parse_circuit_ma(maddr)
        relay = ID.from_base58(relay_addr.get_peer_id())
        relay_transport = relay_addr.decapsulate_code(P_P2P)
        known = [relay_transport] if str(relay_transport) not in ("", "/") else []
        return await self.circuit.dial_peer_info(PeerInfo(target, [maddr]), relay_info=PeerInfo(relay, known))


class _HouseholdRelay(CircuitV2Protocol):
    """0.8.1's relay protocol with reservations bound to the asking connection and our limits."""

    def __init__(self, host: IHost):
        super().__init__(host, allow_hop=False)
        self.household = RelayLimits()
        self._reserved_from: dict[ID, str] = {}  # reservation holder -> the IP address it asked from
        self._circuits: dict[ID, int] = {}  # peer -> relayed connections it is an end of
        self._buckets: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # stream -> (credit, when)

    def offer(self, limits: RelayLimits) -> None:
        self.household = limits
        self.limits = Libp2pRelayLimits(duration=int(limits.max_circuit_s), data=limits.max_circuit_bytes,
                                        max_circuit_conns=limits.max_circuits_per_peer,
                                        max_reservations=limits.max_reservations,
                                        reservation_ttl=int(limits.reservation_ttl_s))
        self.resource_manager = RelayResourceManager(self.limits, self.host)
        self.allow_hop = True
        self.host.set_stream_handler(HOP_PROTOCOL, self._handle_hop_stream)

    async def _handle_reserve(self, stream, msg: HopMessage) -> None:
        peer = stream.muxed_conn.peer_id
        msg.ClearField("peer")  # reserve for the authenticated peer, never a name it gives
        ip = _remote_ip(stream)
        holders = {p: i for p, i in self._reserved_from.items() if self.resource_manager.has_reservation(p)}
        if peer not in holders and ip is not None \
                and sum(1 for i in holders.values() if i == ip) >= self.household.max_reservations_per_ip:
            log.info("relay: refusing a slot to %s: %s holds %d already", peer, ip, self.household.max_reservations_per_ip)
            await self._refuse(stream)
            return
        if ip is not None:
            holders[peer] = ip  # before the answer goes out: the next request may come before we return
        self._reserved_from = holders
        await super()._handle_reserve(stream, msg)

    async def _handle_connect(self, stream, msg: HopMessage) -> None:
        source, target = stream.muxed_conn.peer_id, ID(msg.peer.id)
        limits = self.household
        if sum(self._circuits.values()) // 2 >= limits.max_circuits \
                or max(self._circuits.get(source, 0), self._circuits.get(target, 0)) >= limits.max_circuits_per_peer:
            log.info("relay: refusing a relayed connection %s -> %s: at the limit", source, target)
            await self._refuse(stream)
            return
        for peer in (source, target):
            self._circuits[peer] = self._circuits.get(peer, 0) + 1
        try:
            await super()._handle_connect(stream, msg)
        finally:
            for peer in (source, target):
                self._circuits[peer] -= 1
                if not self._circuits[peer]:
                    del self._circuits[peer]

    async def _read_stream_with_retry(self, stream, *args, **kwargs) -> bytes | None:
        """What the relay forwards, read no faster than `max_circuit_bytes_per_s` per stream (each
        direction of a circuit is one stream): a token bucket of one second's worth."""
        data = await super()._read_stream_with_retry(stream, *args, **kwargs)
        rate = self.household.max_circuit_bytes_per_s
        if data and rate > 0:
            now = trio.current_time()
            credit, then = self._buckets.get(stream, (float(rate), now))
            credit = min(float(rate), credit + (now - then) * rate) - len(data)
            self._buckets[stream] = (credit, now)
            if credit < 0:
                await trio.sleep(-credit / rate)
        return data

    async def _refuse(self, stream) -> None:
        from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

        await self._send_status(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "relay at its limit")
        await self._close_stream(stream)


def _remote_ip(stream) -> str | None:
    from mesh.libp2p_addressing import local_ip

    ip = local_ip(getattr(stream, "muxed_conn", None), remote=True)
    return None if ip is None else str(ip)


class _PromptDCUtR(DCUtRProtocol):
    """DCUtR whose plain dial before the punch gives up after UNILATERAL_DIAL_S."""

    async def _try_unilateral_upgrade(self, peer_id: ID) -> bool:
        with trio.move_on_after(UNILATERAL_DIAL_S):
            return await super()._try_unilateral_upgrade(peer_id)
        return False


class Relaying:
    """Circuit relay v2 (accepting relayed connections; relaying on `offer`) and DCUtR for `host`.

    Start with `await nursery.start(relaying.run)` once the host runs."""

    def __init__(self, host: IHost):
        self.host = host
        self.protocol = _HouseholdRelay(host)
        self.circuit = CircuitV2Transport(host, self.protocol, RelayConfig(roles=RelayRole.STOP))
        host.get_network().transport_manager.add_transport(_CircuitDial(self.circuit))
        self.dcutr = _PromptDCUtR(host)
        self.reserved: dict[str, list[str]] = {}  # relay peer id -> our addresses through it
        self.met_relayed: set[str] = set()  # peers we had a relayed connection to (a later direct one was punched)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from libp2p.tools.anyio_service import background_trio_service

        async with background_trio_service(self.protocol), background_trio_service(self.dcutr):
            task_status.started()
            await trio.sleep_forever()

    def offer(self, limits: RelayLimits) -> None:
        self.protocol.offer(limits)

    @property
    def relaying(self) -> bool:
        return self.protocol.allow_hop

    async def reserve(self, relay_id: str, relay_addrs: list[multiaddr.Multiaddr], *, timeout: float) -> list[str]:
        relay = ID.from_base58(relay_id)
        with trio.move_on_after(timeout):
            try:
                stream = await self.host.new_stream(relay, [HOP_PROTOCOL])
            except Exception as err:  # the relay does not speak the hop protocol, or is gone
                raise DialError(relay_id, f"not a relay: {err}") from err
            try:
                ok = await self.circuit._make_reservation(stream, relay)  # the refresher is ours
            finally:
                with trio.move_on_after(1.0):
                    await stream.close()
            if not ok:
                raise DialError(relay_id, "the relay refused a slot")
            me = self.host.get_id()
            self.reserved[relay_id] = [f"{addr}/p2p/{relay_id}{CIRCUIT}/p2p/{me}" for addr in relay_addrs
                                       if CIRCUIT not in str(addr)]
            return self.reserved[relay_id]
        raise DialError(relay_id, f"no relay slot within {timeout:g} s")

    def release(self, relay_id: str) -> None:
        self.reserved.pop(relay_id, None)
        self.circuit._reservations.pop(ID.from_base58(relay_id), None)

    def relays(self) -> list[str]:
        """Relays we hold a live slot on: connected, and not within RENEW_BEFORE_S of expiry."""
        now, live = time.time(), []
        for relay_id in list(self.reserved):
            relay = ID.from_base58(relay_id)
            connected = any(not c.is_closed for c in self.host.get_network().get_connections(relay))
            expires = self.circuit._reservations.get(relay, 0)
            if not connected or expires <= now:
                log.info("relay slot on %s lost (%s)", relay_id, "disconnected" if not connected else "expired")
                self.release(relay_id)
            elif expires - now > RENEW_BEFORE_S:
                live.append(relay_id)
        return live

    def addrs(self) -> list[str]:
        return [addr for relay_id in self.reserved for addr in self.reserved[relay_id]]

    def path(self, peer: ID) -> PathKind | None:
        conns = [c for c in self.host.get_network().get_connections(peer) if not c.is_closed]
        if not conns:
            return None
        if any(is_relayed(c) for c in conns):
            self.met_relayed.add(str(peer))
            if all(is_relayed(c) for c in conns):
                return PathKind.RELAYED
        return PathKind.PUNCHED if str(peer) in self.met_relayed else PathKind.DIRECT

    def relay_of(self, peer: ID) -> str | None:
        """The relay our relayed connection to `peer` runs through, when that is the only way;
        read from the connection's address (`/p2p/<relay>/p2p-circuit/p2p/<peer>`)."""
        if self.path(peer) is not PathKind.RELAYED:
            return None
        for conn in self.host.get_network().get_connections(peer):
            try:
                addrs = [str(a) for a in conn.get_transport_addresses()]
            except Exception:  # a connection type 0.8.1 could not describe
                continue
            for addr in addrs:
                head = addr.split(CIRCUIT, 1)[0] if CIRCUIT in addr else ""
                if "/p2p/" in head:
                    return head.rsplit("/p2p/", 1)[1]
        return None

    async def upgrade(self, peer: ID, *, timeout: float) -> bool:
        """Hole punching to `peer` now (DCUtR), within `timeout`; True when a direct connection is up."""
        if self.path(peer) is not PathKind.RELAYED:
            return self.path(peer) is not None
        with trio.move_on_after(timeout):
            try:
                await self.dcutr.initiate_hole_punch(peer)
            except Exception as err:  # the library's own errors: the attempt failed
                log.info("hole punching to %s failed: %r", peer, err)
            while self.path(peer) is PathKind.RELAYED:  # the peer's own attempt may still land
                await trio.sleep(0.05)
        return self.path(peer) in (PathKind.DIRECT, PathKind.PUNCHED)


__all__ = ["Relaying", "STOP_PROTOCOL_ID", "is_relayed"]
