"""`mesh.reachability` over the in-memory transport's routers and relays: the verdicts, relaying,
relay slots kept through a relay's crash, and what a dial-back server refuses."""

from __future__ import annotations

import pytest
import trio

from mesh.errors import DialError
from mesh.memory_nat import NatType
from mesh.memory_transport import MemoryTransport
from mesh.reachability import (
    PUBLIC_CONFIRMATIONS,
    Answer,
    DialBack,
    Reachability,
    ReachKeeper,
    ReachSettings,
    ask_dial_back,
    judge,
)
from mesh.transport import RelayLimits, is_relayed_addr
from tests.mesh.test_memory_nat import INTERNET, public_addr, world


def test_judge_needs_two_peers_that_reached_us_and_more_than_missed():
    assert PUBLIC_CONFIRMATIONS == 2
    assert judge([]) is Reachability.UNKNOWN
    assert judge([Answer("liar", True)]) is Reachability.UNKNOWN  # one peer, however sure, is not enough
    assert judge([Answer("liar", True), Answer("liar", True), Answer("honest", False)]) is Reachability.PRIVATE
    assert judge([Answer("a", True), Answer("b", True)]) is Reachability.PUBLIC
    assert judge([Answer("a", True), Answer("b", True), Answer("c", False), Answer("d", False)]) \
        is Reachability.PRIVATE  # as many missed as reached: not public
    assert judge([Answer("a", False)]) is Reachability.PRIVATE
    assert judge([Answer("a", True), Answer("a", False), Answer("b", True)]) is Reachability.PUBLIC


async def test_a_public_node_is_judged_public_by_its_peers_and_offers_relaying(autojump_clock):
    network = world(node=NatType.NONE, a=NatType.NONE, b=NatType.NONE, c=NatType.SYMMETRIC)
    async with MemoryTransport.open(network, "node") as node, MemoryTransport.open(network, "a") as a, \
            MemoryTransport.open(network, "b") as b, MemoryTransport.open(network, "c") as c:
        for peer in (a, b, c):
            DialBack(peer).install()
        for peer in (a, b):
            await node.dial(public_addr(peer), timeout=5)
        await c.dial(public_addr(node), timeout=5)  # a peer behind NAT dials it too, and dials it back fine
        changes = []
        keeper = ReachKeeper(node, ReachSettings(watch_every_s=1.0), on_change=lambda: changes.append(1))
        async with trio.open_nursery() as nursery:
            await nursery.start(keeper.run)
            with trio.fail_after(30):
                await keeper.wait_checked()
            assert keeper.reachability is Reachability.PUBLIC and keeper.relaying and changes
            assert "node" in network.relays.offers and node.relays() == []
            nursery.cancel_scope.cancel()


async def test_a_nated_node_is_private_holds_two_relays_and_replaces_one_that_crashes(autojump_clock):
    network = world(home=NatType.PORT_RESTRICTED, r1=NatType.NONE, r2=NatType.NONE, r3=NatType.NONE,
                    client=NatType.NONE)
    async with MemoryTransport.open(network, "home") as home, MemoryTransport.open(network, "r1") as r1, \
            MemoryTransport.open(network, "r2") as r2, MemoryTransport.open(network, "r3") as r3, \
            MemoryTransport.open(network, "client") as client:
        async with trio.open_nursery() as nursery:
            for relay in (r1, r2, r3):
                await nursery.start(ReachKeeper(relay, ReachSettings(relay=True)).run)
                await home.dial(public_addr(relay), timeout=5)
            announced = []
            keeper = ReachKeeper(home, ReachSettings(watch_every_s=5.0), on_change=lambda: announced.append(home.addrs))
            await nursery.start(keeper.run)
            with trio.fail_after(30):
                await keeper.wait_checked()
                while len(home.relays()) < 2:
                    await trio.sleep(1)
            assert keeper.reachability is Reachability.PRIVATE and not keeper.relaying
            assert home.relays() == ["r1", "r2"]
            relayed = [a for a in home.addrs if is_relayed_addr(a)]
            assert relayed == [f"{public_addr(r)}/p2p-circuit/p2p/home" for r in (r1, r2)]
            assert announced[-1] == home.addrs  # re-announced with them: what its record carries
            assert network.reachable_from(INTERNET, "home")

            network.crash("r1")
            assert home.relays() == ["r2"]
            with trio.fail_after(30):
                while len(home.relays()) < 2:
                    await trio.sleep(1)
            assert home.relays() == ["r2", "r3"] and announced[-1] == home.addrs
            assert not any(a.startswith(public_addr(r1)) for a in home.addrs)
            client.add_peer_addrs("home", announced[-1])
            home.set_handler("/echo", _close_at_once)
            await client.open_stream("home", "/echo", timeout=5)  # through r2, as the record says
            nursery.cancel_scope.cancel()


async def _close_at_once(stream) -> None:
    await stream.aclose()


async def test_a_dial_back_server_refuses_other_peers_and_relayed_addresses(autojump_clock):
    network = world(asker=NatType.NONE, server=NatType.NONE, victim=NatType.NONE)
    async with MemoryTransport.open(network, "asker") as asker, MemoryTransport.open(network, "server") as server, \
            MemoryTransport.open(network, "victim") as victim:
        DialBack(server).install()
        await asker.dial(public_addr(server), timeout=5)
        assert (await ask_dial_back(asker, "server", [public_addr(asker)])).reached
        with pytest.raises(DialError, match="not a direct address of the asking peer asker"):
            await ask_dial_back(asker, "server", [public_addr(victim)])  # aim its dials at a third party: no
        relayed = f"{public_addr(server)}/p2p-circuit/p2p/asker"
        with pytest.raises(DialError, match="dial-back refused"):
            await ask_dial_back(asker, "server", [relayed])  # reached through a relay proves nothing
        assert "victim" not in server.connected_peers()


async def test_a_relay_told_to_relay_offers_at_once_with_limits(autojump_clock):
    network = world(relay=NatType.NONE)
    async with MemoryTransport.open(network, "relay") as relay:
        limits = RelayLimits(max_reservations=3)
        keeper = ReachKeeper(relay, ReachSettings(relay=True, relay_limits=limits))
        async with trio.open_nursery() as nursery:
            await nursery.start(keeper.run)
            assert keeper.relaying and network.relays.offers["relay"] == limits
            nursery.cancel_scope.cancel()
