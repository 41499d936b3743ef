"""Transports for the mesh tests: kits that make in-memory or libp2p peers, and an echo hop."""

from __future__ import annotations

import socket

import pytest

from mesh.identity import load_or_create_identity, peer_id_of
from mesh.libp2p_transport import Libp2pTransport
from mesh.memory_transport import DEFAULT_SEGMENT, MemoryNetwork, MemoryTransport, memory_addr
from tests.mesh.echo_peer import ECHO, IO_TIMEOUT, echo_hop

__all__ = ["ECHO", "IO_TIMEOUT", "LOOPBACK", "Libp2pKit", "MemoryKit", "echo_hop"]

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


class MemoryKit:
    """Peers on one `MemoryNetwork`, named peer1, peer2, ..."""

    name = "memory"

    def __init__(self):
        self.network = MemoryNetwork()
        self._count = 0

    def transport(self):
        self._count += 1
        return MemoryTransport.open(self.network, f"peer{self._count}")

    def unreachable_addr(self) -> str:
        """A well-formed address on the peers' segment where nobody listens."""
        return memory_addr(DEFAULT_SEGMENT, "ghost", "ghost")


class Libp2pKit:
    """libp2p peers in this process on 127.0.0.1, each on a free port."""

    name = "libp2p"

    def transport(self):
        return Libp2pTransport(listen=LOOPBACK)

    def unreachable_addr(self) -> str:
        """A loopback port nobody listens on (bound, then closed), with some peer's id."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        return f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id_of(load_or_create_identity(None))}"


@pytest.fixture(params=[MemoryKit, Libp2pKit], ids=["memory", "libp2p"])
def kit(request):
    return request.param()
