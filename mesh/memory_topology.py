"""Where in-memory peers are and what reaches what: segments, hosts, routers (NAT) and addresses.

The rules `mesh.memory_transport` dials by, apart from its connections and streams. A peer lives on
a host attached to segments (a LAN, the internet) and listens on some of them; an address
`/memory/<segment>/<host>/p2p/<peer id>` is reachable from peers on that segment, a loopback (or
wildcard) one only from the same host. A host behind a router (`NatType` other than NONE) reaches
one `outside` segment through it, and its router's public mapping there,
`/memory/<outside>/nat-<host>/p2p/<peer>`, exists while a direct connection goes out through it
and lets new connections in as `mesh.memory_nat.admits` says. A relayed address
`<relay's address>/p2p-circuit/p2p/<peer>` is reachable when the relay's address is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from mesh.memory_nat import NatType, admits
from mesh.transport import CIRCUIT

ADDR_PREFIX = "/memory/"
DEFAULT_SEGMENT = "shared"  # the segment of a peer never attached elsewhere: such peers all reach each other
LOOPBACK = "loopback"  # a host's own segment: reachable from peers on that host only
WILDCARD = "*"  # listen on every segment of the host and on loopback (0.0.0.0); dialled, it is loopback


class Attachment(NamedTuple):
    host: str  # peers on one host share its loopback (and its router)
    segments: tuple[str, ...]  # the networks the host is on
    nat: NatType = NatType.NONE  # its router, if it is behind one
    outside: str | None = None  # behind a router: the segment it reaches through it


class Via(NamedTuple):
    relay_addr: str
    relay: str
    peer: str


def memory_addr(segment: str, host: str, peer_id: str) -> str:
    return f"{ADDR_PREFIX}{segment}/{host}/p2p/{peer_id}"


def parse_addr(addr: str) -> tuple[str, str, str] | None:
    """(segment, host, peer id) of `/memory/<segment>/<host>/p2p/<peer id>`; None for anything else."""
    parts = addr[len(ADDR_PREFIX):].split("/") if addr.startswith(ADDR_PREFIX) else []
    if len(parts) != 4 or parts[2] != "p2p" or not all(parts):
        return None
    return parts[0], parts[1], parts[3]


def parse_relayed(addr: str) -> Via | None:
    """(relay's address, relay, peer) of `<relay's address>/p2p-circuit/p2p/<peer>`; None otherwise."""
    relay_addr, sep, tail = addr.partition(CIRCUIT)
    relay = parse_addr(relay_addr)
    if not sep or relay is None or not tail.startswith("/p2p/") or "/" in tail[5:] or not tail[5:]:
        return None
    return Via(relay_addr, relay[2], tail[5:])


class Topology:
    """Attachments, listening segments and the reachability rules; `connections` (peer -> peers it
    has a direct connection with) is the network's live map, which routers' mappings follow."""

    def __init__(self, connections: dict[str, set[str]]):
        self._connections = connections
        self._attachments: dict[str, Attachment] = {}
        self._listening: dict[str, frozenset[str]] = {}  # peer -> segments it accepts connections on

    def attach(self, peer_id: str, segments: Iterable[str], *, host: str | None = None,
               nat: NatType = NatType.NONE, outside: str | None = None) -> None:
        """Put `peer_id` on `host` (its own by default) on `segments`, before it opens its transport;
        behind a router of kind `nat` through which it reaches segment `outside`."""
        segments = tuple(dict.fromkeys(segments))
        bad = [s for s in segments if s in (LOOPBACK, WILDCARD) or not s or "/" in s]
        if not segments or bad or (host is not None and (not host or "/" in host)):
            raise ValueError(f"peer {peer_id} needs segments other than {LOOPBACK!r} and {WILDCARD!r} and a host, "
                             f"without '/': got segments {list(segments)}, host {host!r}")
        if (nat is NatType.NONE) != (outside is None) or outside in (*segments, LOOPBACK, WILDCARD, "") \
                or (outside is not None and "/" in outside):
            raise ValueError(f"peer {peer_id}: a router (nat {nat.value}) needs an outside segment other than its "
                             f"own, and no router none: got outside {outside!r}")
        at = Attachment(host or peer_id, segments, nat, outside)
        for other, theirs in self._attachments.items():
            if other != peer_id and theirs.host == at.host and theirs[2:] != at[2:]:
                raise ValueError(f"peer {peer_id} on host {at.host} must be behind the router {other} is behind "
                                 f"({theirs.nat.value}, outside {theirs.outside})")
        self._attachments[peer_id] = at

    def attachment(self, peer_id: str) -> Attachment:
        return self._attachments.get(peer_id) or Attachment(peer_id, (DEFAULT_SEGMENT,))

    def nat(self, peer_id: str) -> NatType:
        return self.attachment(peer_id).nat

    def public_host(self, peer_id: str) -> str:
        """The host others see a connection from `peer_id` come from: its router's, behind NAT."""
        at = self.attachment(peer_id)
        return at.host if at.nat is NatType.NONE else f"nat-{at.host}"

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

    def mapping_addr(self, peer_id: str) -> str | None:
        """The address of `peer_id`'s router mapping, while it has one (None without a router)."""
        at = self.attachment(peer_id)
        if at.nat is NatType.NONE or not self._mapped(peer_id):
            return None
        return memory_addr(at.outside, self.public_host(peer_id), peer_id)

    def outward(self, peer: str) -> tuple[str, ...]:
        """The segments `peer` reaches: its own, and through its router the outside one."""
        at = self.attachment(peer)
        return at.segments if at.outside is None else (*at.segments, at.outside)

    def why_unreachable(self, src: str, addr: str) -> str | None:
        """Why `src` cannot reach `addr` (None when it can): a segment it is not on (nor reaches through
        its router), another host's loopback, or a segment where the peer does not listen. For a
        relayed address: why it cannot reach the relay. A peer that is down, or a router that drops
        the dial (`why_dropped`), is not this function's business: those dials fail later."""
        return self.why_not(self.attachment(src), addr, src)

    def why_not(self, here: Attachment, addr: str, src: str = "a newcomer") -> str | None:
        """`why_unreachable` from a peer attached as `here` (one that need not exist)."""
        via = parse_relayed(addr)
        if via is not None:
            why = self.why_not(here, via.relay_addr, src)
            return None if why is None else f"relay {via.relay}: {why}"
        parsed = parse_addr(addr)
        if parsed is None:
            return "not a /memory/<segment>/<host>/p2p/<peer id> address"
        segment, host, peer = parsed
        there = self.attachment(peer)
        if segment in (LOOPBACK, WILDCARD):  # 127.0.0.1 or 0.0.0.0: the dialer's own host
            if here.host != there.host:
                return f"a {segment} address leads to {src}'s own host, where {peer} is not"
            segment = LOOPBACK
        elif segment not in here.segments and segment != here.outside:
            through = f", and {here.outside} through its router" if here.outside else ""
            return f"{src} is not on segment {segment} (it is on {', '.join(here.segments)}{through})"
        elif segment == there.outside and host == self.public_host(peer):
            return None  # its router's mapping: whether the router lets the dial in is `why_dropped`'s
        elif host != there.host:
            return f"{peer} is not on host {host}"
        listening = self._listening.get(peer)
        if listening is not None and segment not in listening:
            return f"{peer} does not listen on {segment}"
        return None

    def why_dropped(self, src: str | None, addr: str) -> str | None:
        """Why the router in front of `addr`'s peer drops a new connection from `src` (None: it lets it
        in, or `addr` is no router's mapping). `src` None: a stranger it never sent to."""
        parsed = parse_addr(addr)
        if parsed is None:
            return None
        segment, host, peer = parsed
        there = self.attachment(peer)
        if there.nat is NatType.NONE or segment != there.outside or host != self.public_host(peer):
            return None
        mapped = self._mapped(peer)
        contacted = src is not None and self.public_host(src) in {self.public_host(q) for q in self._outbound(peer)}
        if admits(there.nat, mapped=mapped, contacted=contacted):
            return None
        return f"{peer}'s {there.nat.value} router lets no new connection in" + ("" if mapped else " (no mapping)")

    def _outbound(self, peer: str) -> list[str]:
        """Peers `peer` has a direct connection with through its router (none on its own segments)."""
        mine = set(self.attachment(peer).segments)
        return [q for q in self._connections.get(peer, ()) if not mine & set(self.attachment(q).segments)]

    def _mapped(self, peer: str) -> bool:  # a router's mapping lives while a connection goes out through it
        return bool(self._outbound(peer))
