"""NAT behaviour for the in-memory transport: the kinds of household routers, as pure rules.

A router keeps a mapping from a peer's private address to a public one while a connection goes out
through it, and filters what comes in on that mapping (RFC 4787's terms; the classic names are
used). `admits` says whether a new, unsolicited connection from outside gets through; `punch_works`
whether two peers that already talk through a relay can open a direct connection by dialling each
other at once (hole punching, libp2p's DCUtR), the standard matrix: it fails only when one side
is symmetric and the other symmetric or port-restricted, because a symmetric router gives a new
port for each destination, which the other side cannot guess and a port-restricted one will not
let in. `mesh.memory_transport` applies these; they are here, apart, so tests can read them whole.
"""

from __future__ import annotations

import enum


class NatType(enum.Enum):
    NONE = "none"  # a public address: no router in the way
    FULL_CONE = "full-cone"  # a mapping, once made, lets anyone in
    RESTRICTED = "restricted"  # ... only hosts (IP addresses) the peer has sent to
    PORT_RESTRICTED = "port-restricted"  # ... only the address and port it sent to: no new connection gets in
    SYMMETRIC = "symmetric"  # a new mapping per destination: nothing gets in, and its ports cannot be guessed


def admits(nat: NatType, *, mapped: bool, contacted: bool) -> bool:
    """Whether a new connection from outside to a peer's public mapping gets through its router.

    `mapped`: the peer has a connection out through the router now (the mapping lives while one
    does). `contacted`: one of those goes to the dialer's host (its IP address). A new connection
    comes from a new port, so a port-restricted router drops it, as a symmetric one does."""
    if nat is NatType.NONE:
        return True
    if not mapped:
        return False
    if nat is NatType.FULL_CONE:
        return True
    return nat is NatType.RESTRICTED and contacted


def punch_works(a: NatType, b: NatType) -> bool:
    """Whether simultaneous dials between peers behind `a` and `b` open a direct connection."""
    hard = (NatType.SYMMETRIC, NatType.PORT_RESTRICTED)
    return not ((a is NatType.SYMMETRIC and b in hard) or (b is NatType.SYMMETRIC and a in hard))
