"""An in-memory `Transport` for tests and the simulator: peers in one process, in trio's clock.

A `MemoryNetwork` knows every peer. Streams (`mesh.memory_streams`) are pairs of byte queues; a
link model (latency and bandwidth per direction, settable per pair of peers) delays delivery, and
the network can cut links (partitions), crash a peer (its streams reset, dials to it fail) or
freeze it (its streams go silent, as with a power cut: only timeouts notice).

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

NAT (issue 24). A host attached with a `NatType` other than NONE sits behind a household router
on its private segments, and reaches one `outside` segment (the internet) through it: it dials out
freely; nobody outside can dial its private addresses (no route: at once). Its router's public
mapping, `/memory/<outside>/nat-<host>/p2p/<peer>`, exists while a connection goes out through it,
and lets a new connection in only as `mesh.memory_nat.admits` says (a full-cone router: anyone; a
restricted one: hosts it has sent to; port-restricted and symmetric: no one); a dial it drops gets
no answer, so only the dial's timeout ends it. Only behind a full-cone router is the mapping among
the peer's `addrs` (libp2p learns it from identify's observed addresses; behind the others it
would be dialled in vain). `mesh.memory_topology` holds these rules, `mesh.memory_nat` the routers'.

Relays (libp2p's circuit relay v2; bookkeeping in `mesh.memory_relay`): a peer that `offer_relay`s
grants slots to peers with a direct connection to it; `reserve` adds
`<relay's address>/p2p-circuit/p2p/<holder>` to the holder's `addrs`. A dial to such an address
opens a circuit: its streams take both legs' latency and the slower leg's bandwidth, stall while
the relay is frozen or a leg is cut, and reset when the relay crashes or a limit ends the circuit;
the slot goes with the relay too, and a circuit idle for `IDLE_CIRCUIT_S` closes. `upgrade` punches a hole (`mesh.memory_nat.punch_works`): one
round trip through the relay and one direct, then a direct connection that new streams take; open
relayed streams keep going until their circuit ends. With `punch_on_relay` the holder starts that
itself on each circuit to it, as libp2p's DCUtR does. `streams_opened` counts streams by protocol
and path (direct, relayed, hole-punched) and `nat_counts` slots, circuits and punches.
Everything runs in trio's clock, deterministically.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import NamedTuple

import trio

from mesh.errors import DialError, StreamClosed
from mesh.memory_nat import NatType, punch_works
from mesh.memory_relay import Circuit, RelayBook, RelayRefused
from mesh.memory_streams import SEND_BUFFER_BYTES, Link, MemoryByteStream, _Pipe
from mesh.memory_topology import (
    ADDR_PREFIX,
    DEFAULT_SEGMENT,
    LOOPBACK,
    WILDCARD,
    Attachment,
    Topology,
    Via,
    memory_addr,
    parse_addr,
    parse_relayed,
)
from mesh.transport import CIRCUIT, ByteStream, PathKind, RelayLimits, StreamHandler, Transport
from mesh.virtual_time import sleep_until

__all__ = ["ADDR_PREFIX", "Attachment", "DEFAULT_SEGMENT", "LOOPBACK", "Link", "MemoryByteStream", "MemoryNetwork",
           "MemoryTransport", "NatType", "SEND_BUFFER_BYTES", "WILDCARD", "memory_addr", "parse_addr", "parse_relayed"]

PUNCH_ATTEMPT_S = 5.0  # a hole punch that cannot work gives up after this, past its round trip through the relay
AUTO_PUNCH_TIMEOUT_S = 30.0
IDLE_CIRCUIT_S = 60.0  # a circuit that carried no stream this long (checked every half of it) is closed
DIRECT, RELAYED, SILENT = "direct", "relayed", "silent"  # how a new connection would go (`MemoryNetwork.route`)
log = logging.getLogger("hearth.mesh")


class Route(NamedTuple):
    kind: str  # DIRECT, RELAYED, or SILENT: only addresses whose dials get no answer
    relay: str | None = None  # RELAYED: the relay to try first (not frozen, if one is not)
    relays: tuple[str, ...] = ()  # RELAYED: every usable relay, in that order (the next when one refuses)


class MemoryNetwork:
    """All in-memory peers of one test or simulation, the links between them, where each is attached
    (and behind which router), where it listens, which of them are connected, and the relays."""

    def __init__(self, default_link: Link = Link(), *, punch_on_relay: bool = False):
        self.peers: dict[str, MemoryTransport] = {}
        self.default_link = default_link
        self.link_model: Callable[[str, str], Link] | None = None
        self.punch_on_relay = punch_on_relay
        self.relays = RelayBook()
        self.nat_counts = self.relays.counts  # slots, circuits, punches: taken and refused
        self.streams_opened: Counter[tuple[str, str]] = Counter()  # (protocol, "direct"/"relayed"/"hole-punched")
        self._links: dict[tuple[str, str], Link] = {}
        self._down: set[str] = set()
        self._frozen: set[str] = set()
        self._cut: set[frozenset[str]] = set()
        self._streams: list[MemoryByteStream] = []
        self._prune_at = 64  # prune finished streams when the list grows past this (amortized O(1) per open)
        self._connections: dict[str, set[str]] = {}  # open peer -> peers it has a direct connection with
        self.topology = Topology(self._connections)  # where peers are, behind which routers; what reaches what
        self._punched: set[frozenset[str]] = set()  # direct connections that hole punching opened
        self._punching: dict[frozenset[str], trio.Event] = {}

    # --- where peers are: `mesh.memory_topology` ---

    def attach(self, peer_id: str, segments: Iterable[str], *, host: str | None = None,
               nat: NatType = NatType.NONE, outside: str | None = None) -> None:
        """Put `peer_id` on `host` (its own by default) on `segments`, before it opens its transport;
        behind a router of kind `nat` through which it reaches segment `outside`."""
        if peer_id in self.peers:
            raise ValueError(f"peer {peer_id} is already open: attach it before opening its transport")
        self.topology.attach(peer_id, segments, host=host, nat=nat, outside=outside)

    def attachment(self, peer_id: str) -> Attachment:
        return self.topology.attachment(peer_id)

    def nat(self, peer_id: str) -> NatType:
        return self.topology.nat(peer_id)

    def public_host(self, peer_id: str) -> str:
        return self.topology.public_host(peer_id)

    def listen(self, peer_id: str, listen: Sequence[str]) -> tuple[str, ...]:
        return self.topology.listen(peer_id, listen)

    def mapping_addr(self, peer_id: str) -> str | None:
        return self.topology.mapping_addr(peer_id)

    def why_unreachable(self, src: str, addr: str) -> str | None:
        return self.topology.why_unreachable(src, addr)

    def why_dropped(self, src: str | None, addr: str) -> str | None:
        return self.topology.why_dropped(src, addr)

    def extra_addrs(self, peer_id: str) -> list[str]:
        """Addresses beyond the listening ones: a full-cone router's mapping, and relayed addresses
        through every relay `peer_id` holds a slot on."""
        mapping = self.mapping_addr(peer_id) if self.nat(peer_id) is NatType.FULL_CONE else None
        extra = [mapping] if mapping else []
        for relay in self.relays.holding(peer_id, trio.current_time()):
            extra += self.relayed_addrs(peer_id, relay)
        return extra

    def relayed_addrs(self, holder: str, relay: str) -> list[str]:
        transport = self.peers.get(relay)
        if transport is None:
            return []
        mapping = self.mapping_addr(relay) if self.nat(relay) is NatType.FULL_CONE else None
        direct = [a for a in transport.listen_addrs if parse_addr(a)[0] != LOOPBACK] + ([mapping] if mapping else [])
        return [f"{addr}{CIRCUIT}/p2p/{holder}" for addr in direct]

    # --- reachability ---

    def _why_not_via(self, src: str, via: Via) -> str | None:
        """Why `src` cannot reach `via.peer` through `via.relay` now (None: a circuit can open)."""
        why = self.why_unreachable(src, via.relay_addr) or self.why_dropped(src, via.relay_addr)
        if why is not None:
            return f"relay {via.relay}: {why}"
        if via.relay not in self.peers or self.is_down(via.relay):
            return f"relay {via.relay} is unreachable"
        if self.relays.slot(via.relay, via.peer, trio.current_time()) is None:
            return f"{via.peer} holds no slot on relay {via.relay}"
        return None

    def route(self, src: MemoryTransport, dst_id: str) -> Route:
        """How a new stream from `src` to `dst_id` would go: over the direct connection, or else the
        circuit, open between them; else through an address `src` knows for it, a direct one first.
        `Route(SILENT)` when only addresses whose dials get no answer are known (a router dropping
        them); `DialError` at once when none is reachable at all."""
        if dst_id in src.connected:
            return Route(DIRECT)
        circuit = self.relays.circuit(src.peer_id, dst_id)
        if circuit is not None:
            return Route(RELAYED, circuit.relay)
        reasons, silent, relays = [], False, []
        for addr in src.known.get(dst_id, ()):
            via = parse_relayed(addr)
            if not addr.endswith(f"/p2p/{dst_id}"):
                why = "an address of another peer"
            elif via is not None:
                why = self._why_not_via(src.peer_id, via)
                if why is None and via.relay not in relays:
                    relays.append(via.relay)
            else:
                why = self.why_unreachable(src.peer_id, addr)
                if why is None:
                    why = self.why_dropped(src.peer_id, addr)
                    if why is None:
                        return Route(DIRECT)
                    silent = True
            if why is not None:
                reasons.append(f"{addr}: {why}")
        if relays:
            relays.sort(key=self.is_frozen)  # a frozen relay last: the dial would hang
            return Route(RELAYED, relays[0], tuple(relays))
        if silent:
            return Route(SILENT)
        raise DialError(dst_id, f"no reachable address from {src.peer_id} (known: {'; '.join(reasons) or 'none'})")

    def check_route(self, src: MemoryTransport, dst_id: str) -> None:
        """DialError unless an address `src` knows for `dst_id` is reachable from it."""
        self.route(src, dst_id)

    def reachable_from(self, segment: str, peer_id: str) -> bool:
        """Whether a newcomer on `segment`, connected to no one, could reach `peer_id` through its
        `addrs` now (directly, through a full-cone router, or through a relay it holds a slot on)."""
        transport = self.peers.get(peer_id)
        if transport is None or self.is_down(peer_id):
            return False
        stranger = Attachment("a newcomer", (segment,))
        for addr in transport.addrs:
            via = parse_relayed(addr)
            if via is not None:
                if self.topology.why_not(stranger, via.relay_addr) is None and via.relay in self.peers \
                        and not self.is_down(via.relay) and self.relays.slot(via.relay, peer_id, trio.current_time()):
                    return True
            elif self.topology.why_not(stranger, addr) is None and self.why_dropped(None, addr) is None:
                return True
        return False

    # --- connections ---

    def connect(self, a: str, b: str) -> None:
        """`a` and `b` now have a direct connection: either may open streams to the other over it."""
        self._connections.setdefault(a, set()).add(b)
        self._connections.setdefault(b, set()).add(a)

    def disconnect(self, a: str, b: str) -> None:
        """Their direct connection dropped: with it a slot either held on the other, and circuits
        through either that the other was an end of."""
        self._connections.get(a, set()).discard(b)
        self._connections.get(b, set()).discard(a)
        self._punched.discard(frozenset((a, b)))
        self._reset_circuits(self.relays.drop_connection(a, b))

    def connections(self, peer_id: str) -> set[str]:
        """The peers `peer_id` has a direct connection with (the live set: the transport keeps it)."""
        return self._connections.setdefault(peer_id, set())

    def connected_peers(self, peer_id: str) -> list[str]:
        """Peers `peer_id` has a direct connection or a circuit with, sorted (a run's order is the seed's)."""
        relayed = {end for c in self.relays.circuits_of(peer_id) for end in c.ends()}
        return sorted((self.connections(peer_id) | relayed) - {peer_id})

    def path(self, src: str, dst: str) -> PathKind | None:
        if dst in self.connections(src):
            return PathKind.PUNCHED if frozenset((src, dst)) in self._punched else PathKind.DIRECT
        return PathKind.RELAYED if self.relays.circuit(src, dst) is not None else None

    def link(self, src: str, dst: str) -> Link:
        if (src, dst) in self._links:
            return self._links[(src, dst)]
        return self.link_model(src, dst) if self.link_model else self.default_link

    def set_link(self, src: str, dst: str, link: Link) -> None:
        self._links[(src, dst)] = link

    def circuit_link(self, src: str, dst: str, circuit: Circuit, nbytes: int) -> Link:
        """The link of a write of `nbytes` over `circuit`: both legs, counted against its byte limit."""
        if circuit.closed:
            raise StreamClosed(dst, f"relayed connection through {circuit.relay} closed")
        circuit.bytes += nbytes
        if circuit.bytes > circuit.limits.max_circuit_bytes:
            self.end_circuit(circuit, "bytes")
            raise StreamClosed(dst, f"relay {circuit.relay} ended the circuit: over {circuit.limits.max_circuit_bytes} "
                                    f"bytes")
        first, second = self.link(src, circuit.relay), self.link(circuit.relay, dst)
        return Link(first.latency_s + second.latency_s, min(first.bandwidth_bps, second.bandwidth_bps))

    def is_down(self, peer_id: str) -> bool:
        return peer_id in self._down

    def is_frozen(self, peer_id: str) -> bool:
        return peer_id in self._frozen

    def is_cut(self, a: str, b: str) -> bool:
        return bool(self._cut) and frozenset((a, b)) in self._cut

    def stalled(self, a: str, b: str, relay: str | None = None) -> bool:
        """Whether nothing gets from `a` to `b` now (through `relay`, if given): an end or the relay
        frozen, or a link on the way cut."""
        if self.is_frozen(a) or self.is_frozen(b):
            return True
        if relay is None:
            return self.is_cut(a, b)
        return self.is_frozen(relay) or self.is_cut(a, relay) or self.is_cut(relay, b)

    def crash(self, peer_id: str) -> None:
        """The peer dies: its streams reset (also those it relays), its slots and circuits go, dials
        to it fail until `restore`."""
        self._down.add(peer_id)
        for stream in [s for s in self._streams if peer_id in (s.local, s.peer_id)]:
            stream.reset()
        self._reset_circuits(self.relays.drop_peer(peer_id))
        for other in list(self._connections.get(peer_id, ())):
            self.disconnect(peer_id, other)

    def freeze(self, peer_id: str) -> None:
        """The peer goes silent without closing anything (power cut, suspended laptop)."""
        self._frozen.add(peer_id)

    def open_streams(self) -> list[MemoryByteStream]:
        """Streams not finished yet, oldest first (both ends of each)."""
        return [s for s in self._streams if not s.finished]

    def reset_streams(self, a: str, b: str) -> int:
        """Reset every open stream between peers `a` and `b` (a dropped connection, relayed ones too);
        returns how many."""
        hit = [s for s in self._streams if {s.local, s.peer_id} == {a, b} and not s.finished]
        for stream in hit:
            stream.reset()
        circuit = self.relays.circuit(a, b)
        if circuit is not None:
            self.end_circuit(circuit, "reset")
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

    # --- circuits and hole punching ---

    def _open_any_circuit(self, a: str, b: str, route: Route) -> Circuit:
        """A circuit through the first of `route`'s relays that grants one (as a dialler tries the next
        relayed address when one fails); DialError with the last refusal when none does."""
        for relay in route.relays[:-1]:
            try:
                return self.open_circuit(a, b, relay)
            except DialError:
                continue
        return self.open_circuit(a, b, route.relays[-1])

    def open_circuit(self, a: str, b: str, relay: str) -> Circuit:
        """A circuit from `a` to `b` through `relay` (DialError naming the limit when it refuses); it
        ends after the relay's `max_circuit_s`; with `punch_on_relay`, `b` starts punching a hole.
        Circuits through `relay` that a direct connection replaced and that carry no stream close first
        (as an idle relayed connection does once its peers talk directly)."""
        for idle in self.relays.circuits_via(relay):
            if idle.b in self.connections(idle.a) and not any(s.circuit is idle and not s.finished for s in self._streams):
                self.end_circuit(idle, "upgraded")
        try:
            circuit = self.relays.open_circuit(relay, a, b, trio.current_time())
        except RelayRefused as err:
            raise DialError(b, str(err)) from None
        self.peers[relay].spawn_task(self._end_circuit_after, circuit)
        if self.punch_on_relay and b in self.peers:
            self.peers[b].spawn_task(self.punch, b, a, AUTO_PUNCH_TIMEOUT_S)
        return circuit

    async def _end_circuit_after(self, circuit: Circuit) -> None:
        """End `circuit` at its lifetime, or once it carried no stream for `IDLE_CIRCUIT_S` (libp2p's
        connection manager trims idle connections; a relay's per-peer limit would fill up otherwise)."""
        with trio.CancelScope() as circuit.timer:
            end = circuit.opened_at + circuit.limits.max_circuit_s
            idle_since = None
            while not circuit.closed:
                now = trio.current_time()
                if now >= end:
                    self.end_circuit(circuit, "lifetime")
                elif any(s.circuit is circuit and not s.finished for s in self._streams):
                    idle_since = None
                elif idle_since is not None and now - idle_since >= IDLE_CIRCUIT_S:
                    self.end_circuit(circuit, "idle")
                else:
                    idle_since = now if idle_since is None else idle_since
                await sleep_until(min(end, now + IDLE_CIRCUIT_S / 2))

    def end_circuit(self, circuit: Circuit, why: str) -> None:
        """The relay ends `circuit` (`why`: "lifetime", "bytes", "reset"): its streams reset."""
        self.relays.close(circuit)
        self.nat_counts[f"circuits_ended_{why}"] += 1
        self._reset_circuits([circuit])

    def _reset_circuits(self, circuits: list[Circuit]) -> None:
        if circuits:
            for stream in [s for s in self._streams if s.circuit is not None and s.circuit in circuits]:
                stream.reset()

    async def punch(self, a: str, b: str, timeout: float) -> bool:
        """`a` and `b`, talking through a relay, dial each other at once (DCUtR); True when they end up
        with a direct connection. One attempt per pair at a time: a second caller waits for the first."""
        pair = frozenset((a, b))
        with trio.move_on_after(timeout):
            while (pending := self._punching.get(pair)) is not None:
                await pending.wait()
            if b in self.connections(a):
                return True
            circuit = self.relays.circuit(a, b)
            if circuit is None or self.is_down(circuit.relay):
                return False
            done = self._punching[pair] = trio.Event()
            self.nat_counts["punches_tried"] += 1  # some end by the caller's timeout: tried - succeeded failed
            try:
                return await self._punch(a, b, circuit)
            finally:
                del self._punching[pair]
                done.set()
        self.nat_counts["punches_timed_out"] += 1
        return False

    async def _punch(self, a: str, b: str, circuit: Circuit) -> bool:
        relay = circuit.relay
        sync = 2 * (self.link(a, relay).latency_s + self.link(relay, b).latency_s)  # CONNECT and SYNC via the relay
        meet = set(self.topology.outward(a)) & set(self.topology.outward(b))
        works = bool(meet) and punch_works(self.nat(a), self.nat(b))
        dial = self.link(a, b).latency_s + self.link(b, a).latency_s if works else PUNCH_ATTEMPT_S
        await sleep_until(trio.current_time() + sync + dial)
        if works and not circuit.closed and not any(self.is_down(p) or self.is_frozen(p) for p in (a, b)) \
                and not self.is_cut(a, b) and a in self.peers and b in self.peers:
            self.connect(a, b)
            self._punched.add(frozenset((a, b)))
            self.nat_counts["punches_succeeded"] += 1
            return True
        self.nat_counts["punches_failed"] += 1
        return False

    # --- streams ---

    def _open(self, src: MemoryTransport, dst_id: str, protocol_id: str) -> MemoryByteStream:
        dst = self.peers.get(dst_id)
        if dst is None or self.is_down(dst_id) or self.is_down(src.peer_id):
            raise DialError(dst_id, "peer unreachable")
        route = self.route(src, dst_id)  # the connection may have dropped while `src` waited for a frozen peer
        circuit = None
        if route.kind == SILENT:
            raise DialError(dst_id, "peer unreachable: no answer from any address")
        if route.kind == DIRECT:
            self.connect(src.peer_id, dst_id)
        else:
            circuit = self.relays.circuit(src.peer_id, dst_id) or self._open_any_circuit(src.peer_id, dst_id, route)
        handler = dst.handlers.get(protocol_id)
        if handler is None:
            raise DialError(dst_id, f"protocol {protocol_id} not supported")
        forward, backward = _Pipe(), _Pipe()
        ours = MemoryByteStream(self, src.peer_id, dst_id, forward, backward, circuit)
        theirs = MemoryByteStream(self, dst_id, src.peer_id, backward, forward, circuit)
        self._streams += [ours, theirs]
        if len(self._streams) > self._prune_at:
            self._streams = [s for s in self._streams if not s.finished]
            self._prune_at = max(64, 2 * len(self._streams))
        kind = "relayed" if circuit else "hole-punched" if frozenset((src.peer_id, dst_id)) in self._punched else "direct"
        self.streams_opened[(protocol_id, kind)] += 1
        dst.spawn(handler, theirs)
        return ours


class MemoryTransport(Transport):
    """One in-memory peer. Use as `async with MemoryTransport.open(network, peer_id) as transport:`."""

    def __init__(self, network: MemoryNetwork, peer_id: str, nursery: trio.Nursery, addrs: tuple[str, ...] = ()):
        self.network, self.peer_id = network, peer_id
        self.handlers: dict[str, StreamHandler] = {}
        self.known: dict[str, list[str]] = {}  # peer -> its addresses, as dialled or added
        self.connected = network.connections(peer_id)  # peers with a direct connection: streams open at once
        self.listen_addrs = addrs
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
                network.relays.withdraw(peer_id)
                network.restore(peer_id)
                nursery.cancel_scope.cancel()

    @property
    def addrs(self) -> list[str]:
        """The listening addresses, then a full-cone router's mapping, then relayed addresses."""
        return [*self.listen_addrs, *self.network.extra_addrs(self.peer_id)]

    async def dial(self, addr: str, *, timeout: float) -> str:
        network, via = self.network, parse_relayed(addr)
        why = network._why_not_via(self.peer_id, via) if via else network.why_unreachable(self.peer_id, addr)
        if why is not None:
            raise DialError(addr, why)
        peer_id = addr.rsplit("/p2p/", 1)[-1]
        dropped = None if via else network.why_dropped(self.peer_id, addr)
        with trio.move_on_after(timeout):
            if dropped is not None or network.is_frozen(peer_id) or (via and network.is_frozen(via.relay)):
                await trio.sleep_forever()
            if peer_id not in network.peers or network.is_down(peer_id):
                raise DialError(addr, "peer unreachable")
            known = self.known.setdefault(peer_id, [])
            if addr not in known:
                known.append(addr)
            if via is None:
                network.connect(self.peer_id, peer_id)
            elif network.path(self.peer_id, peer_id) is None:
                network.open_circuit(self.peer_id, peer_id, via.relay)
            return peer_id
        raise DialError(addr, f"no answer within {timeout:g} s" + (f": {dropped}" if dropped else ""))

    async def dial_back(self, addr: str, *, timeout: float) -> bool:
        """Whether a new connection from here to `addr` would come up, never using one that is open:
        False at once without a route or with the peer down, after `timeout` when nothing answers."""
        network, via = self.network, parse_relayed(addr)
        why = network._why_not_via(self.peer_id, via) if via else network.why_unreachable(self.peer_id, addr)
        peer_id = addr.rsplit("/p2p/", 1)[-1]
        if why is not None or peer_id not in network.peers or network.is_down(peer_id):
            return False
        if (via is None and network.why_dropped(self.peer_id, addr) is not None) \
                or network.stalled(self.peer_id, peer_id, via.relay if via else None):
            await trio.sleep(timeout)
            return False
        return True

    async def open_stream(self, peer_id: str, protocol_id: str, *, timeout: float) -> ByteStream:
        route = self.network.route(self, peer_id)  # no route to host: at once
        with trio.move_on_after(timeout):
            if route.kind == SILENT:
                await trio.sleep_forever()
            while self.network.stalled(self.peer_id, peer_id, route.relay):
                await trio.sleep(0.05)
            return self.network._open(self, peer_id, protocol_id)
        raise DialError(peer_id, f"no answer within {timeout:g} s")

    def set_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        self.handlers[protocol_id] = handler

    def add_peer_addrs(self, peer_id: str, addrs: list[str]) -> None:
        self.known[peer_id] = list(addrs)

    # --- NAT traversal ---

    def offer_relay(self, limits: RelayLimits) -> None:
        self.network.relays.offer(self.peer_id, limits)

    async def reserve(self, relay_peer_id: str, *, timeout: float) -> list[str]:
        network, relay = self.network, relay_peer_id
        if relay not in self.connected:
            raise DialError(relay, f"{self.peer_id} has no direct connection to {relay} to take a slot over")
        with trio.move_on_after(timeout):
            if network.stalled(self.peer_id, relay):
                await trio.sleep_forever()
            rtt = network.link(self.peer_id, relay).latency_s + network.link(relay, self.peer_id).latency_s
            await sleep_until(trio.current_time() + rtt)
            if relay not in self.connected or network.is_down(relay):
                raise DialError(relay, "the connection to the relay dropped")
            try:
                network.relays.reserve(relay, self.peer_id, network.public_host(self.peer_id), trio.current_time())
            except RelayRefused as err:
                raise DialError(relay, str(err)) from None
            return network.relayed_addrs(self.peer_id, relay)
        raise DialError(relay, f"no answer within {timeout:g} s")

    def release(self, relay_peer_id: str) -> None:
        self.network.relays.release(relay_peer_id, self.peer_id)

    def relays(self) -> list[str]:
        return self.network.relays.holding(self.peer_id, trio.current_time())

    def path(self, peer_id: str) -> PathKind | None:
        return self.network.path(self.peer_id, peer_id)

    def connected_peers(self) -> list[str]:
        return self.network.connected_peers(self.peer_id)

    def relay_of(self, peer_id: str) -> str | None:
        circuit = self.network.relays.circuit(self.peer_id, peer_id)
        return circuit.relay if circuit is not None and self.path(peer_id) is PathKind.RELAYED else None

    async def upgrade(self, peer_id: str, *, timeout: float) -> bool:
        return await self.network.punch(self.peer_id, peer_id, timeout)

    # --- the transport's tasks ---

    def spawn(self, handler: StreamHandler, stream: MemoryByteStream) -> None:
        self._nursery.start_soon(self._run_handler, handler, stream)

    def spawn_task(self, fn: Callable, *args) -> None:
        """Run `fn(*args)` in this peer's nursery: it ends when the peer's transport closes."""
        self._nursery.start_soon(fn, *args)

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
