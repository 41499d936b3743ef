"""Relays in the in-memory transport: who offers relaying, who holds a slot where, and the circuits.

The bookkeeping of libp2p's circuit relay v2, without I/O: a peer that offers relaying
(`Transport.offer_relay`) grants slots (reservations) to peers connected to it, within its
`RelayLimits` (slots in all and per IP address, each for `reservation_ttl_s`), and carries
circuits: relayed connections between a peer and the holder of a slot, within the limits on
circuits in all and per peer; each circuit ends after `max_circuit_s` or `max_circuit_bytes`.
A slot goes with the relay (crash) and with the connection to it; a circuit goes with the relay,
with either end, or with the connection from either end to the relay. `mesh.memory_transport`
moves the bytes and asks this book what is allowed; refusals raise `RelayRefused` naming the limit.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from mesh.transport import RelayLimits


class RelayRefused(Exception):
    """A relay would not grant a slot or a circuit; says which limit."""


@dataclass
class Reservation:
    holder: str
    relay: str
    ip: str  # the holder's public address (its router's, behind NAT): the per-IP limit counts these
    expires_at: float


@dataclass(eq=False)
class Circuit:
    """One relayed connection between `a` (who dialled) and `b` (the slot's holder) through `relay`."""

    a: str
    b: str
    relay: str
    opened_at: float
    limits: RelayLimits
    bytes: int = 0  # carried so far, both ways together
    closed: bool = False
    timer: object = None  # what ends it after `max_circuit_s` (a cancel scope), cancelled when it closes

    def ends(self) -> frozenset[str]:
        return frozenset((self.a, self.b))


class RelayBook:
    def __init__(self):
        self.offers: dict[str, RelayLimits] = {}
        self._slots: dict[str, dict[str, Reservation]] = {}  # relay -> holder -> its slot, in the order taken
        self._circuits: dict[frozenset[str], Circuit] = {}  # pair of ends -> the circuit between them
        self.counts: Counter[str] = Counter()

    def offer(self, relay: str, limits: RelayLimits) -> None:
        self.offers[relay] = limits

    def withdraw(self, relay: str) -> list[Circuit]:
        """`relay` stops relaying (its transport closed): its slots and circuits go; returns the circuits."""
        self.offers.pop(relay, None)
        return self.drop_relay(relay)

    # --- slots ---

    def reserve(self, relay: str, holder: str, ip: str, now: float) -> Reservation:
        limits = self.offers.get(relay)
        if limits is None:
            self.counts["reservations_refused"] += 1
            raise RelayRefused(f"{relay} is not a relay (it offers no relay service)")
        slots = self._slots.setdefault(relay, {})
        self._expire(relay, now)
        held = slots.get(holder)
        if held is None:
            reason = None
            if len(slots) >= limits.max_reservations:
                reason = f"all {limits.max_reservations} reservation slots are taken"
            elif sum(r.ip == ip for r in slots.values()) >= limits.max_reservations_per_ip:
                reason = f"{limits.max_reservations_per_ip} slots are already held from {ip}"
            if reason is not None:
                self.counts["reservations_refused"] += 1
                raise RelayRefused(f"relay {relay} refused a slot: {reason}")
            held = slots[holder] = Reservation(holder, relay, ip, 0.0)
            self.counts["reservations"] += 1
        held.expires_at = now + limits.reservation_ttl_s  # taking it again renews it
        return held

    def slot(self, relay: str, holder: str, now: float) -> Reservation | None:
        held = self._slots.get(relay, {}).get(holder)
        return held if held is not None and held.expires_at > now else None

    def holding(self, holder: str, now: float) -> list[str]:
        """The relays `holder` has a live slot on, in the order it took them."""
        return [relay for relay, slots in self._slots.items()
                if holder in slots and slots[holder].expires_at > now]

    def release(self, relay: str, holder: str) -> None:
        self._slots.get(relay, {}).pop(holder, None)

    def slots_on(self, relay: str, now: float) -> int:
        self._expire(relay, now)
        return len(self._slots.get(relay, {}))

    def _expire(self, relay: str, now: float) -> None:
        slots = self._slots.get(relay, {})
        for holder in [h for h, r in slots.items() if r.expires_at <= now]:
            del slots[holder]

    # --- circuits ---

    def circuit(self, a: str, b: str) -> Circuit | None:
        return self._circuits.get(frozenset((a, b)))

    def circuits_of(self, peer: str) -> list[Circuit]:
        """The circuits `peer` is an end of."""
        return [c for c in self._circuits.values() if peer in (c.a, c.b)]

    def circuits_via(self, relay: str) -> list[Circuit]:
        return [c for c in self._circuits.values() if c.relay == relay]

    def open_circuit(self, relay: str, a: str, b: str, now: float) -> Circuit:
        """A circuit from `a` to `b`, who must hold a live slot on `relay`."""
        limits = self.offers.get(relay)
        reason = None
        if limits is None:
            reason = f"{relay} does not relay"
        elif self.slot(relay, b, now) is None:
            reason = f"{b} holds no slot on {relay}"
        else:
            through = self.circuits_via(relay)
            if len(through) >= limits.max_circuits:
                reason = f"all {limits.max_circuits} circuits are in use"
            else:
                for end in (a, b):
                    if sum(end in (c.a, c.b) for c in through) >= limits.max_circuits_per_peer:
                        reason = f"{end} already has {limits.max_circuits_per_peer} circuits through it"
                        break
        if reason is not None:
            self.counts["circuits_refused"] += 1
            raise RelayRefused(f"relay {relay} refused a circuit from {a} to {b}: {reason}")
        circuit = self._circuits[frozenset((a, b))] = Circuit(a, b, relay, now, limits)
        self.counts["circuits"] += 1
        return circuit

    def close(self, circuit: Circuit) -> None:
        circuit.closed = True
        if self._circuits.get(circuit.ends()) is circuit:
            del self._circuits[circuit.ends()]
        cancel = getattr(circuit.timer, "cancel", None)
        if cancel is not None:
            cancel()

    # --- losses: each returns the circuits closed, whose streams the network resets ---

    def drop_relay(self, relay: str) -> list[Circuit]:
        """`relay` is gone: every slot on it and every circuit through it."""
        self._slots.pop(relay, None)
        return self._close_all([c for c in self._circuits.values() if c.relay == relay])

    def drop_peer(self, peer: str) -> list[Circuit]:
        """`peer` is gone: its slots everywhere, its circuits (and, if it relays, everything on it)."""
        for slots in self._slots.values():
            slots.pop(peer, None)
        return self.drop_relay(peer) + self._close_all([c for c in self._circuits.values() if peer in (c.a, c.b)])

    def drop_connection(self, x: str, y: str) -> list[Circuit]:
        """The connection between `x` and `y` dropped: a slot either held on the other, and circuits
        through either of them that the other was an end of."""
        self._slots.get(x, {}).pop(y, None)
        self._slots.get(y, {}).pop(x, None)
        return self._close_all([c for c in self._circuits.values()
                                if (c.relay == x and y in (c.a, c.b)) or (c.relay == y and x in (c.a, c.b))])

    def _close_all(self, circuits: list[Circuit]) -> list[Circuit]:
        for circuit in circuits:
            self.close(circuit)
        return circuits
