"""NAT, relays and hole punching in the in-memory transport (issue 24).

Households sit behind routers on their own segments and reach the internet through them; a relay
on the internet carries circuits to the peers holding its slots; two peers talking through a relay
punch a hole when their routers allow it. Everything in virtual time (`autojump_clock`), so
timings are exact.
"""

from __future__ import annotations

import pytest
import trio

from mesh.errors import DialError, StreamClosed, TransportTimeout
from mesh.memory_nat import NatType, admits, punch_works
from mesh.memory_transport import Link, MemoryNetwork, MemoryTransport, memory_addr, parse_relayed
from mesh.transport import MessageStream, PathKind, RelayLimits, is_relayed_addr
from protocol import Ping, Pong, Role
from tests.mesh.conftest import ECHO, echo_hop

INTERNET = "internet"
N = NatType


def world(*, punch_on_relay: bool = False, **peers: NatType) -> MemoryNetwork:
    """Each peer on the internet (NatType.NONE) or on a home segment of its own behind its router."""
    network = MemoryNetwork(punch_on_relay=punch_on_relay)
    for peer, nat in peers.items():
        if nat is N.NONE:
            network.attach(peer, [INTERNET])
        else:
            network.attach(peer, [f"home-{peer}"], nat=nat, outside=INTERNET)
    return network


def public_addr(transport: MemoryTransport) -> str:
    return transport.listen_addrs[0]


async def ping(transport: MemoryTransport, peer_id: str, nonce: int = 1, timeout: float = 5) -> MessageStream:
    stream = MessageStream(await transport.open_stream(peer_id, ECHO, timeout=timeout), Role.CLIENT, io_timeout=timeout)
    assert await stream.request(Ping(nonce=nonce)) == Pong(nonce=nonce)
    return stream


async def serve_through(relay: MemoryTransport, home: MemoryTransport, client: MemoryTransport,
                        limits: RelayLimits = RelayLimits()) -> None:
    """`home` echoes, holds a slot on `relay` (which relays within `limits`), and `client` knows its
    addresses: the relayed one among them."""
    home.set_handler(ECHO, echo_hop)
    relay.offer_relay(limits)
    await home.dial(public_addr(relay), timeout=5)
    await home.reserve(relay.peer_id, timeout=5)
    client.add_peer_addrs(home.peer_id, home.addrs)


def test_the_rules_admit_and_punch_as_routers_do():
    assert admits(N.NONE, mapped=False, contacted=False)
    assert not admits(N.FULL_CONE, mapped=False, contacted=False)  # no mapping yet: nothing to come in on
    assert admits(N.FULL_CONE, mapped=True, contacted=False)
    assert admits(N.RESTRICTED, mapped=True, contacted=True) and not admits(N.RESTRICTED, mapped=True, contacted=False)
    assert not any(admits(nat, mapped=True, contacted=True) for nat in (N.PORT_RESTRICTED, N.SYMMETRIC))
    failing = {frozenset((N.SYMMETRIC,)), frozenset((N.SYMMETRIC, N.PORT_RESTRICTED))}
    for a in N:
        for b in N:
            assert punch_works(a, b) is (frozenset((a, b)) not in failing), (a, b)


async def test_a_private_address_has_no_route_and_the_nated_peer_dials_out(autojump_clock):
    network = world(home=N.PORT_RESTRICTED, server=N.NONE)
    async with MemoryTransport.open(network, "home") as home, MemoryTransport.open(network, "server") as server:
        home.set_handler(ECHO, echo_hop)
        server.set_handler(ECHO, echo_hop)
        started = trio.current_time()
        with pytest.raises(DialError, match="not on segment home-home"):
            await server.dial(home.addrs[0], timeout=5)
        assert trio.current_time() == started  # no route to a private address: at once
        assert await home.dial(public_addr(server), timeout=5) == "server"
        await ping(home, "server")
        await ping(server, "home")  # back over the connection home opened
        assert home.path("server") is PathKind.DIRECT and server.connected_peers() == ["home"]


@pytest.mark.parametrize("nat", [N.RESTRICTED, N.PORT_RESTRICTED, N.SYMMETRIC])
async def test_a_mapping_behind_any_router_but_full_cone_is_not_announced_and_drops_strangers(autojump_clock, nat):
    network = world(home=nat, server=N.NONE, stranger=N.NONE)
    async with MemoryTransport.open(network, "home") as home, MemoryTransport.open(network, "server") as server, \
            MemoryTransport.open(network, "stranger") as stranger:
        await home.dial(public_addr(server), timeout=5)
        mapping = network.mapping_addr("home")
        assert mapping == memory_addr(INTERNET, "nat-home", "home") and mapping not in home.addrs
        started = trio.current_time()
        with pytest.raises(DialError, match="no answer within 3 s"):
            await stranger.dial(mapping, timeout=3)
        assert trio.current_time() - started == pytest.approx(3)  # dropped, not refused: only the timeout ends it
        # a restricted router lets in a new connection from a host it has sent to; the others do not
        assert await server.dial_back(mapping, timeout=3) is (nat is N.RESTRICTED)


async def test_a_full_cone_mapping_is_announced_and_dialled_once_the_peer_went_out(autojump_clock):
    network = world(home=N.FULL_CONE, server=N.NONE, stranger=N.NONE)
    async with MemoryTransport.open(network, "home") as home, MemoryTransport.open(network, "server") as server, \
            MemoryTransport.open(network, "stranger") as stranger:
        home.set_handler(ECHO, echo_hop)
        assert network.mapping_addr("home") is None and not network.reachable_from(INTERNET, "home")
        await home.dial(public_addr(server), timeout=5)
        mapping = memory_addr(INTERNET, "nat-home", "home")
        assert mapping in home.addrs and network.reachable_from(INTERNET, "home")
        assert await stranger.dial(mapping, timeout=5) == "home"
        await ping(stranger, "home")
        network.crash("server")
        assert mapping in home.addrs  # the stranger's connection through the router keeps the mapping
        network.crash("stranger")  # the last one: the mapping lapses
        assert mapping not in home.addrs and network.mapping_addr("home") is None


async def test_dial_back_is_a_fresh_check_from_the_dialers_position(autojump_clock):
    network = world(home=N.SYMMETRIC, server=N.NONE, other=N.NONE)
    async with MemoryTransport.open(network, "home") as home, MemoryTransport.open(network, "server") as server, \
            MemoryTransport.open(network, "other") as other:
        await home.dial(public_addr(server), timeout=5)
        assert not await server.dial_back(home.addrs[0], timeout=5)  # connected, yet its private address: no
        assert await server.dial_back(public_addr(other), timeout=5)
        assert "other" not in server.connected_peers()  # checked, not connected
        network.freeze("other")
        started = trio.current_time()
        assert not await server.dial_back(public_addr(other), timeout=4)
        assert trio.current_time() - started == pytest.approx(4)
        network.crash("other")
        assert not await server.dial_back(public_addr(other), timeout=4)


async def test_a_slot_on_a_relay_gives_a_relayed_address_that_a_stranger_reaches_through_both_legs(autojump_clock):
    network = world(home=N.SYMMETRIC, relay=N.NONE, client=N.NONE)
    for src, dst, ms in (("client", "relay", 10), ("relay", "client", 10), ("relay", "home", 30),
                         ("home", "relay", 30), ("client", "home", 5), ("home", "client", 5)):
        network.set_link(src, dst, Link(ms / 1000))
    async with MemoryTransport.open(network, "home") as home, MemoryTransport.open(network, "relay") as relay, \
            MemoryTransport.open(network, "client") as client:
        home.set_handler(ECHO, echo_hop)
        relay.offer_relay(RelayLimits())
        await home.dial(public_addr(relay), timeout=5)
        started = trio.current_time()
        relayed = await home.reserve("relay", timeout=5)
        assert trio.current_time() - started == pytest.approx(0.06)  # a round trip to the relay
        assert relayed == [f"{public_addr(relay)}/p2p-circuit/p2p/home"] and relayed[0] in home.addrs
        assert parse_relayed(relayed[0]) == (public_addr(relay), "relay", "home")
        assert home.relays() == ["relay"] and network.reachable_from(INTERNET, "home")

        client.add_peer_addrs("home", home.addrs)  # its record: private, loopback and relayed addresses
        assert client.path("home") is None
        stream = MessageStream(await client.open_stream("home", ECHO, timeout=5), Role.CLIENT)
        started = trio.current_time()
        assert await stream.request(Ping(nonce=1)) == Pong(nonce=1)
        assert trio.current_time() - started == pytest.approx(2 * (0.010 + 0.030))  # both legs, both ways
        assert client.path("home") is PathKind.RELAYED and home.path("client") is PathKind.RELAYED
        assert "client" in home.connected_peers() and network.streams_opened[(ECHO, "relayed")] == 1

        home.release("relay")
        assert home.relays() == [] and not any(is_relayed_addr(a) for a in home.addrs)


async def test_a_slot_is_refused_by_a_peer_that_does_not_relay_or_is_not_connected(autojump_clock):
    network = world(home=N.SYMMETRIC, plain=N.NONE, relay=N.NONE)
    async with MemoryTransport.open(network, "home") as home, MemoryTransport.open(network, "plain") as _, \
            MemoryTransport.open(network, "relay") as relay:
        relay.offer_relay(RelayLimits())
        with pytest.raises(DialError, match="no direct connection to relay"):
            await home.reserve("relay", timeout=5)
        await home.dial(memory_addr(INTERNET, "plain", "plain"), timeout=5)
        with pytest.raises(DialError, match="plain is not a relay"):
            await home.reserve("plain", timeout=5)
        assert home.relays() == [] and network.nat_counts["reservations_refused"] == 1


async def test_a_relay_keeps_its_limits_on_slots(autojump_clock):
    network = MemoryNetwork()
    network.attach("relay", [INTERNET])
    for peer, host in (("a1", "house-a"), ("a2", "house-a"), ("b", "house-b"), ("c", "house-c")):
        network.attach(peer, [f"lan-{host}"], host=host, nat=N.SYMMETRIC, outside=INTERNET)
    async with MemoryTransport.open(network, "relay") as relay, MemoryTransport.open(network, "a1") as a1, \
            MemoryTransport.open(network, "a2") as a2, MemoryTransport.open(network, "b") as b, \
            MemoryTransport.open(network, "c") as c:
        relay.offer_relay(RelayLimits(max_reservations=2, max_reservations_per_ip=1, reservation_ttl_s=600))
        for peer in (a1, a2, b, c):
            await peer.dial(public_addr(relay), timeout=5)
        await a1.reserve("relay", timeout=5)
        with pytest.raises(DialError, match="1 slots are already held from nat-house-a"):
            await a2.reserve("relay", timeout=5)  # one home, one public address
        await b.reserve("relay", timeout=5)
        with pytest.raises(DialError, match="all 2 reservation slots are taken"):
            await c.reserve("relay", timeout=5)
        await trio.sleep(600)  # not renewed: the slots lapse, and their addresses with them
        assert a1.relays() == [] and not any(is_relayed_addr(a) for a in a1.addrs)
        await c.reserve("relay", timeout=5)
        assert c.relays() == ["relay"]


async def test_a_relay_keeps_its_limits_on_circuits(autojump_clock):
    network = world(home=N.SYMMETRIC, other=N.SYMMETRIC, relay=N.NONE, x=N.NONE, y=N.NONE)
    async with MemoryTransport.open(network, "home") as home, MemoryTransport.open(network, "other") as other, \
            MemoryTransport.open(network, "relay") as relay, MemoryTransport.open(network, "x") as x, \
            MemoryTransport.open(network, "y") as y:
        relay.offer_relay(RelayLimits(max_circuits=2, max_circuits_per_peer=1))
        for peer in (home, other):
            peer.set_handler(ECHO, echo_hop)
            await peer.dial(public_addr(relay), timeout=5)
            await peer.reserve("relay", timeout=5)
            x.add_peer_addrs(peer.peer_id, peer.addrs)
            y.add_peer_addrs(peer.peer_id, peer.addrs)
        await ping(x, "home")
        with pytest.raises(DialError, match="x already has 1 circuits through it"):
            await x.open_stream("other", ECHO, timeout=5)
        await ping(y, "other")
        with pytest.raises(DialError, match="all 2 circuits are in use"):
            await y.open_stream("home", ECHO, timeout=5)
        assert network.nat_counts["circuits"] == 2 and network.nat_counts["circuits_refused"] == 2


async def test_a_circuit_ends_at_its_byte_and_time_limits(autojump_clock):
    network = world(home=N.SYMMETRIC, relay=N.NONE, client=N.NONE)
    async with MemoryTransport.open(network, "home") as home, MemoryTransport.open(network, "relay") as relay, \
            MemoryTransport.open(network, "client") as client:
        await serve_through(relay, home, client, RelayLimits(max_circuit_bytes=2000, max_circuit_s=60))
        stream = await ping(client, "home")
        with pytest.raises(StreamClosed, match="over 2000 bytes"):
            for nonce in range(2, 200):
                await stream.request(Ping(nonce=nonce))
        assert network.nat_counts["circuits_ended_bytes"] == 1

        opened = trio.current_time()
        stream = await ping(client, "home")  # a new circuit
        with pytest.raises(StreamClosed):
            for nonce in range(2, 100):
                await trio.sleep(5)
                await stream.request(Ping(nonce=nonce))
        assert trio.current_time() - opened == pytest.approx(60)
        assert network.nat_counts["circuits_ended_lifetime"] == 1


async def test_an_idle_circuit_closes_and_a_new_stream_opens_another(autojump_clock):
    network = world(home=N.SYMMETRIC, relay=N.NONE, client=N.NONE)
    async with MemoryTransport.open(network, "home") as home, MemoryTransport.open(network, "relay") as relay, \
            MemoryTransport.open(network, "client") as client:
        await serve_through(relay, home, client)
        await (await ping(client, "home")).aclose()
        await trio.sleep(120)
        assert client.path("home") is None and network.nat_counts["circuits_ended_idle"] == 1
        await ping(client, "home")
        assert network.nat_counts["circuits"] == 2 and home.relays() == ["relay"]  # the slot stays


async def test_a_relay_crash_resets_relayed_streams_and_takes_the_slot_with_it(autojump_clock):
    network = world(home=N.SYMMETRIC, relay=N.NONE, spare=N.NONE, client=N.NONE)
    async with MemoryTransport.open(network, "home") as home, MemoryTransport.open(network, "relay") as relay, \
            MemoryTransport.open(network, "spare") as spare, MemoryTransport.open(network, "client") as client:
        home.set_handler(ECHO, echo_hop)
        for r in (relay, spare):
            r.offer_relay(RelayLimits())
            await home.dial(public_addr(r), timeout=5)
            await home.reserve(r.peer_id, timeout=5)
        client.add_peer_addrs("home", home.addrs)
        stream = await ping(client, "home")
        assert network.relays.circuit("client", "home").relay == "relay"  # the first relayed address

        await stream.send(Ping(nonce=2))
        network.freeze("relay")  # frozen: relayed streams go silent, only timeouts notice
        with pytest.raises(TransportTimeout):
            await stream.receive(timeout=3)
        network.restore("relay")
        assert await stream.receive(timeout=3) == Pong(nonce=2)  # thawed: the late answer comes through

        network.crash("relay")  # mid-stream
        with pytest.raises(StreamClosed, match="reset"):
            await stream.request(Ping(nonce=3))
        assert home.relays() == ["spare"] and not any(a.startswith(public_addr(relay)) for a in home.addrs)
        assert client.path("home") is None
        await ping(client, "home")  # through the other relayed address in its record
        assert network.relays.circuit("client", "home").relay == "spare"


@pytest.mark.parametrize("client_nat, home_nat", [(N.NONE, N.SYMMETRIC), (N.FULL_CONE, N.SYMMETRIC),
                                                  (N.RESTRICTED, N.SYMMETRIC), (N.PORT_RESTRICTED, N.RESTRICTED),
                                                  (N.PORT_RESTRICTED, N.SYMMETRIC), (N.SYMMETRIC, N.SYMMETRIC)])
async def test_hole_punching_follows_the_routers(autojump_clock, client_nat, home_nat):
    network = world(client=client_nat, home=home_nat, relay=N.NONE)
    for src, dst, ms in (("client", "relay", 10), ("relay", "home", 30), ("client", "home", 20)):
        network.set_link(src, dst, Link(ms / 1000))
        network.set_link(dst, src, Link(ms / 1000))
    async with MemoryTransport.open(network, "home") as home, MemoryTransport.open(network, "relay") as relay, \
            MemoryTransport.open(network, "client") as client:
        home.set_handler(ECHO, echo_hop)
        relay.offer_relay(RelayLimits())
        await home.dial(public_addr(relay), timeout=5)
        await home.reserve("relay", timeout=5)
        await client.dial(public_addr(relay), timeout=5)
        client.add_peer_addrs("home", home.addrs)
        relayed = await ping(client, "home")
        started = trio.current_time()
        works = punch_works(client_nat, home_nat)
        assert await client.upgrade("home", timeout=10) is works
        if not works:  # one round trip through the relay, then an attempt that gets nowhere
            assert trio.current_time() - started == pytest.approx(2 * 0.040 + 5.0)
            assert client.path("home") is PathKind.RELAYED and network.nat_counts["punches_failed"] == 1
            return
        assert trio.current_time() - started == pytest.approx(2 * 0.040 + 2 * 0.020)  # via the relay, then direct
        assert client.path("home") is PathKind.PUNCHED and home.path("client") is PathKind.PUNCHED
        await ping(client, "home", nonce=2)  # a new stream: direct
        assert network.streams_opened[(ECHO, "hole-punched")] == 1
        assert await relayed.request(Ping(nonce=3)) == Pong(nonce=3)  # the relayed one keeps going...
        network.crash("relay")
        with pytest.raises(StreamClosed):  # ... until the relay goes
            await relayed.request(Ping(nonce=4))
        await ping(client, "home", nonce=5)  # the direct connection stays


async def test_the_holder_punches_by_itself_when_told_to(autojump_clock):
    network = world(punch_on_relay=True, client=N.PORT_RESTRICTED, home=N.RESTRICTED, relay=N.NONE)
    async with MemoryTransport.open(network, "home") as home, MemoryTransport.open(network, "relay") as relay, \
            MemoryTransport.open(network, "client") as client:
        await serve_through(relay, home, client)
        await ping(client, "home")
        await trio.sleep(1)
        assert client.path("home") is PathKind.PUNCHED and network.nat_counts["punches_succeeded"] == 1
        assert await client.upgrade("home", timeout=5)  # already direct: at once


async def test_upgrade_without_a_relayed_connection_is_false_and_a_direct_one_true(autojump_clock):
    network = world(a=N.NONE, b=N.NONE)
    async with MemoryTransport.open(network, "a") as a, MemoryTransport.open(network, "b") as _:
        assert not await a.upgrade("b", timeout=5) and a.path("b") is None
        await a.dial(public_addr(_), timeout=5)
        assert await a.upgrade("b", timeout=5) and a.path("b") is PathKind.DIRECT
