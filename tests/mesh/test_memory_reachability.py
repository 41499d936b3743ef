"""The in-memory network reaches a peer only through an address the dialer can reach.

A node on a LAN of distinct hosts once announced its wildcard listen address (0.0.0.0), which
only its own host can dial; on one machine every test passed. These tests hold the in-memory
transport to the same rules, so that class of bug fails in tests and in the simulator too.
"""

from __future__ import annotations

import pytest
import trio

from mesh.errors import DialError
from mesh.memory_transport import LOOPBACK, WILDCARD, MemoryNetwork, MemoryTransport, memory_addr
from mesh.transport import MessageStream
from protocol import Ping, Pong, Role
from tests.mesh.conftest import ECHO, IO_TIMEOUT, echo_hop


async def ping(transport: MemoryTransport, peer_id: str, nonce: int = 1) -> None:
    stream = MessageStream(await transport.open_stream(peer_id, ECHO, timeout=IO_TIMEOUT), Role.CLIENT)
    assert await stream.request(Ping(nonce=nonce)) == Pong(nonce=nonce)
    await stream.aclose()


def lans() -> MemoryNetwork:
    """Host a on LAN a, b on LAN b, and bridge on both."""
    network = MemoryNetwork()
    network.attach("a", ["lan-a"])
    network.attach("b", ["lan-b"])
    network.attach("bridge", ["lan-a", "lan-b"])
    return network


async def test_a_wildcard_listen_gives_the_hosts_addresses_not_the_wildcard():
    async with MemoryTransport.open(lans(), "bridge") as bridge:
        assert bridge.addrs == [memory_addr("lan-a", "bridge", "bridge"), memory_addr("lan-b", "bridge", "bridge"),
                                memory_addr(LOOPBACK, "bridge", "bridge")]


async def test_listening_on_a_segment_the_host_is_not_on_is_refused():
    with pytest.raises(ValueError, match="lan-b"):
        async with MemoryTransport.open(lans(), "a", listen=["lan-b"]):
            pass


async def test_a_peer_is_dialled_only_on_a_segment_the_dialer_shares(autojump_clock):
    network = lans()
    async with MemoryTransport.open(network, "a") as a, MemoryTransport.open(network, "b") as b, \
            MemoryTransport.open(network, "bridge") as bridge:
        bridge.set_handler(ECHO, echo_hop)
        on_lan_a, on_lan_b, loopback = bridge.addrs
        started = trio.current_time()
        for addr in (on_lan_b, loopback):
            with pytest.raises(DialError) as caught:
                await a.dial(addr, timeout=5)
            assert addr in str(caught.value)
        with pytest.raises(DialError, match="not on segment lan-a"):
            await b.dial(on_lan_a, timeout=5)
        assert trio.current_time() == started  # no route to host: at once, not after a timeout
        assert await a.dial(on_lan_a, timeout=5) == "bridge"
        await ping(a, "bridge")


async def test_loopback_and_wildcard_addresses_reach_only_the_same_host(autojump_clock):
    """Why the LAN bug hid: from the node's own host its wildcard address works; from another it cannot."""
    network = MemoryNetwork()
    for peer, host in (("node", "box"), ("local-client", "box"), ("remote-client", "laptop")):
        network.attach(peer, ["lan"], host=host)
    wildcard = memory_addr(WILDCARD, "box", "node")
    async with MemoryTransport.open(network, "node") as node, MemoryTransport.open(network, "local-client") as local, \
            MemoryTransport.open(network, "remote-client") as remote:
        node.set_handler(ECHO, echo_hop)
        loopback = node.addrs[-1]
        for addr in (loopback, wildcard):
            local.add_peer_addrs("node", [addr])
            await ping(local, "node")
            network.reset_streams("local-client", "node")  # a new connection, through this address
            remote.add_peer_addrs("node", [addr])
            with pytest.raises(DialError, match="where node is not"):
                await ping(remote, "node")


async def test_a_stream_needs_a_known_reachable_address(autojump_clock):
    network = lans()
    async with MemoryTransport.open(network, "a") as a, MemoryTransport.open(network, "bridge") as bridge, \
            MemoryTransport.open(network, "b") as b:
        bridge.set_handler(ECHO, echo_hop)
        with pytest.raises(DialError, match=r"no reachable address from a \(known: none\)"):
            await ping(a, "bridge")  # never learned where it is
        a.add_peer_addrs("bridge", [bridge.addrs[1], b.addrs[0]])
        with pytest.raises(DialError) as caught:
            await ping(a, "bridge")
        assert "not on segment lan-b" in str(caught.value) and "an address of another peer" in str(caught.value)
        a.add_peer_addrs("bridge", bridge.addrs)  # as from its record: one of them is reachable
        await ping(a, "bridge")


async def test_a_connection_carries_streams_both_ways_until_it_drops(autojump_clock):
    """As libp2p reuses a connection: the dialled peer opens streams back without knowing an address."""
    network = MemoryNetwork()
    async with MemoryTransport.open(network, "client") as client, MemoryTransport.open(network, "node") as node:
        client.set_handler(ECHO, echo_hop)
        with pytest.raises(DialError, match="known: none"):
            await ping(node, "client")
        await client.dial(node.addrs[0], timeout=5)
        await ping(node, "client")
        network.reset_streams("client", "node")
        with pytest.raises(DialError, match="known: none"):
            await ping(node, "client")
