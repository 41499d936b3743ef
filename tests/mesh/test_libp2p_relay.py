"""Relays and hole punching over libp2p on loopback: a relay (hop), a peer that holds a slot on it,
and a dialler that reaches that peer only by its relayed address, then directly.

Loopback has no NAT, so the upgrade here succeeds by DCUtR's first step (dialling the peer's own
addresses); through real NATs (tests/integration/test_nat.py) it takes the punch itself.
"""

from __future__ import annotations

import pytest
import trio

from mesh.errors import DialError
from mesh.libp2p_transport import Libp2pTransport
from mesh.reachability import DialBack, Reachability, ReachKeeper, ReachSettings, ask_dial_back
from mesh.transport import MessageStream, PathKind, RelayLimits, is_relayed_addr
from protocol import Ping, Pong, Role
from tests.mesh.conftest import ECHO, IO_TIMEOUT, LOOPBACK, echo_hop

pytestmark = pytest.mark.timeout(60)


async def ping(client: Libp2pTransport, peer_id: str) -> None:
    stream = MessageStream(await client.open_stream(peer_id, ECHO, timeout=5), Role.CLIENT, io_timeout=IO_TIMEOUT)
    try:
        assert await stream.request(Ping(nonce=7)) == Pong(nonce=7)
    finally:
        await stream.aclose()


async def test_a_peer_is_reached_through_its_relay_slot_then_directly() -> None:
    async with Libp2pTransport(listen=LOOPBACK) as relay, Libp2pTransport(listen=LOOPBACK) as private, \
            Libp2pTransport(listen=LOOPBACK) as dialler:
        relay.offer_relay(RelayLimits())
        private.set_handler(ECHO, echo_hop)
        await private.dial(relay.addrs[0], timeout=5)
        relayed = await private.reserve(relay.peer_id, timeout=5)
        assert relayed and all(is_relayed_addr(a) and a.endswith(f"/p2p/{private.peer_id}") for a in relayed)
        assert private.relays() == [relay.peer_id] and set(relayed) <= set(private.addrs)

        dialler.add_peer_addrs(private.peer_id, relayed)  # nothing but the relayed address
        await ping(dialler, private.peer_id)
        assert dialler.path(private.peer_id) is PathKind.RELAYED
        assert dialler.relay_of(private.peer_id) == relay.peer_id

        assert await dialler.upgrade(private.peer_id, timeout=15)
        assert dialler.path(private.peer_id) is PathKind.PUNCHED and dialler.relay_of(private.peer_id) is None
        await ping(dialler, private.peer_id)  # a new stream: over the direct connection


async def test_a_peer_that_does_not_relay_refuses_a_slot_and_a_full_relay_too() -> None:
    async with Libp2pTransport(listen=LOOPBACK) as plain, Libp2pTransport(listen=LOOPBACK) as relay, \
            Libp2pTransport(listen=LOOPBACK) as first, Libp2pTransport(listen=LOOPBACK) as second:
        relay.offer_relay(RelayLimits(max_reservations=1))
        await first.dial(plain.addrs[0], timeout=5)
        with pytest.raises(DialError, match="not a relay"):
            await first.reserve(plain.peer_id, timeout=5)
        await first.dial(relay.addrs[0], timeout=5)
        await first.reserve(relay.peer_id, timeout=5)
        await second.dial(relay.addrs[0], timeout=5)
        with pytest.raises(DialError, match="refused"):
            await second.reserve(relay.peer_id, timeout=5)
        assert second.relays() == [] and not any(is_relayed_addr(a) for a in second.addrs)


async def test_a_relay_slot_is_lost_with_the_relay() -> None:
    async with Libp2pTransport(listen=LOOPBACK) as private:
        async with Libp2pTransport(listen=LOOPBACK) as relay:
            relay.offer_relay(RelayLimits())
            await private.dial(relay.addrs[0], timeout=5)
            await private.reserve(relay.peer_id, timeout=5)
            assert private.relays() == [relay.peer_id]
        with trio.fail_after(10):
            while private.relays():
                await trio.sleep(0.05)
        assert not any(is_relayed_addr(a) for a in private.addrs)


async def test_dial_back_reaches_a_listening_peer_on_a_new_connection_and_not_a_closed_port() -> None:
    async with Libp2pTransport(listen=LOOPBACK) as asker, Libp2pTransport(listen=LOOPBACK) as helper:
        DialBack(helper).install()
        await asker.dial(helper.addrs[0], timeout=5)
        answer = await ask_dial_back(asker, helper.peer_id, asker.addrs)
        assert answer.reached and answer.observed == "/ip4/127.0.0.1"
        closed = f"/ip4/127.0.0.1/tcp/1/p2p/{asker.peer_id}"
        assert not (await ask_dial_back(asker, helper.peer_id, [closed])).reached
        with pytest.raises(DialError, match="not a direct address of the asking peer"):
            await ask_dial_back(asker, helper.peer_id, [f"/ip4/127.0.0.1/tcp/1/p2p/{helper.peer_id}"])


async def test_a_keeper_with_two_peers_reaching_it_is_public_and_relays() -> None:
    async with Libp2pTransport(listen=LOOPBACK) as node, Libp2pTransport(listen=LOOPBACK) as a, \
            Libp2pTransport(listen=LOOPBACK) as b:
        for peer in (a, b):
            DialBack(peer).install()
            await node.dial(peer.addrs[0], timeout=5)
        changes = []
        keeper = ReachKeeper(node, ReachSettings(watch_every_s=0.2), on_change=lambda: changes.append(1))
        async with trio.open_nursery() as nursery:
            await nursery.start(keeper.run)
            with trio.fail_after(20):
                await keeper.wait_checked()
            assert keeper.reachability is Reachability.PUBLIC and keeper.relaying and changes
            assert node.relays() == []
            nursery.cancel_scope.cancel()


async def test_a_relay_paces_each_way_of_a_circuit_to_its_rate() -> None:
    """600 kB through a relay allowing 200 kB/s (a second's worth at once): at least 2 s."""
    size, rate = 600_000, 200_000
    got = trio.Event()

    async def sink(stream) -> None:
        received = 0
        while received < size:
            data = await stream.receive_some(1 << 16)
            if not data:
                return
            received += len(data)
        got.set()

    async with Libp2pTransport(listen=LOOPBACK) as relay, Libp2pTransport(listen=LOOPBACK) as private, \
            Libp2pTransport(listen=LOOPBACK) as dialler:
        relay.offer_relay(RelayLimits(max_circuit_bytes_per_s=rate))
        private.set_handler("/test/sink/1", sink)
        await private.dial(relay.addrs[0], timeout=5)
        dialler.add_peer_addrs(private.peer_id, await private.reserve(relay.peer_id, timeout=5))
        stream = await dialler.open_stream(private.peer_id, "/test/sink/1", timeout=5)
        began = trio.current_time()
        with trio.fail_after(30):
            await stream.send_all(b"x" * size)
            await got.wait()
        assert trio.current_time() - began >= (size - rate) / rate * 0.9
