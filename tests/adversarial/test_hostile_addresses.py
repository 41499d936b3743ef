"""Addresses a hostile peer hands us (identify, DHT answers, mDNS): what we dial, and how much.

Any DHT peer can tell us addresses for any other peer id, and any peer lists its own. Noise checks
the peer id on every connection, so a wrong address cannot impersonate anyone; what is left is
wasted dials and dials aimed at third parties. These show the bounds: addresses we were given for a
peer (bootstrap, its record) are dialled before anything others said of it, never more than
MAX_DIAL_ADDRS addresses per dial, and nothing that is not an address of a host.
"""

from __future__ import annotations

import multiaddr
import pytest
import trio
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PERMANENT_ADDR_TTL

from mesh.addresses import Interface, dial_order
from mesh.libp2p_addressing import MAX_DIAL_ADDRS, _dial_peer
from mesh.libp2p_transport import Libp2pTransport
from mesh.transport import MessageStream
from protocol import Ping, Pong, Role
from tests.mesh.conftest import ECHO, IO_TIMEOUT, LOOPBACK, echo_hop

LAN = [Interface.parse("127.0.0.1/8"), Interface.parse("10.77.0.2/24")]


def junk(count: int, template: str = "/ip4/10.77.0.{i}/tcp/4001") -> list[multiaddr.Multiaddr]:
    return [multiaddr.Multiaddr(template.format(i=i + 10)) for i in range(count)]


def test_made_up_addresses_on_our_own_lan_never_outrank_the_ones_we_were_given():
    given = [multiaddr.Multiaddr("/ip4/192.0.2.50/tcp/4001")]  # another network, so ranked below our LAN
    order = dial_order(junk(20) + given, LAN, given)
    assert order[0] == given[0]


def test_what_is_not_an_address_of_a_host_is_never_dialled():
    hostile = [multiaddr.Multiaddr(a) for a in (
        "/ip4/0.0.0.0/tcp/1", "/ip6/::/tcp/1", "/ip4/224.0.0.251/tcp/5353", "/ip6/ff02::1/tcp/1",
        "/ip6/fe80::1/tcp/1", "/dns4/evil.example/tcp/1", "/unix/tmp/x")]
    assert dial_order(hostile, LAN) == []


class _RefusingNetwork:
    """A libp2p network whose every dial fails, counting them; the peerstore holds what a hostile peer said."""

    def __init__(self, addrs):
        self.dialled: list[str] = []
        self.peerstore = type("Store", (), {"addrs": staticmethod(lambda peer: addrs)})()

    def get_connections(self, peer):
        return []

    async def dial_addr(self, addr, peer):
        self.dialled.append(str(addr))
        raise SwarmException("refused")


async def test_a_list_of_a_thousand_addresses_costs_at_most_the_cap_in_dials():
    network = _RefusingNetwork(junk(1000, "/ip4/100.64.0.1/tcp/{i}"))
    peer = ID.from_base58("12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA")
    with pytest.raises(SwarmException, match="unable to connect"):
        await _dial_peer(network, peer, LAN, [], {})
    assert len(network.dialled) == MAX_DIAL_ADDRS


async def test_a_poisoned_peerstore_does_not_stop_us_reaching_a_peer_at_its_given_address():
    """A hostile DHT peer filled our peerstore with addresses for the node that nobody answers at
    (more than the cap, ranked above the real one); the address we were given still gets dialled."""
    async with Libp2pTransport(listen=LOOPBACK) as node, Libp2pTransport(listen=LOOPBACK) as client:
        node.set_handler(ECHO, echo_hop)
        client.add_peer_addrs(node.peer_id, node.addrs)
        poison = junk(MAX_DIAL_ADDRS + 4, "/ip4/198.51.100.{i}/tcp/4001")  # routable: ranked before loopback
        client.host.get_peerstore().add_addrs(ID.from_base58(node.peer_id), poison, PERMANENT_ADDR_TTL)
        with trio.fail_after(10):
            stream = MessageStream(await client.open_stream(node.peer_id, ECHO, timeout=8), Role.CLIENT,
                                   io_timeout=IO_TIMEOUT)
            await stream.send(Ping(nonce=3))
            assert await stream.receive(timeout=IO_TIMEOUT) == Pong(nonce=3)
