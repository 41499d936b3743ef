"""`mesh.inbound_guard`: its counting on its own, and joined to py-libp2p hosts on 127.0.0.1 (the
flood itself is in tests/adversarial/test_connection_flood.py)."""

from __future__ import annotations

import pytest
import trio
from libp2p.network.config import ConnectionConfig

from mesh.errors import DialError, StreamClosed
from mesh.inbound_guard import InboundGuard, InboundLimits
from mesh.libp2p_transport import Libp2pTransport
from mesh.transport import MessageStream
from protocol import Ping, Pong, Role
from tests.mesh.conftest import ECHO, LOOPBACK, echo_hop

pytestmark = pytest.mark.timeout(60)


def test_pending_handshakes_are_limited_per_address_and_in_all():
    guard = InboundGuard(InboundLimits(max_pending=3, max_pending_per_ip=2, max_connections_per_ip=4))
    a1, a2 = guard.admit("10.0.0.1"), guard.admit("10.0.0.1")
    assert a1 and a2 and guard.admit("10.0.0.1") is None  # 2 pending from it
    b1 = guard.admit("10.0.0.2")
    assert b1 and guard.admit("10.0.0.3") is None  # 3 pending in all
    guard.established(a1, object())  # a handshake done frees a pending place
    assert guard.admit("10.0.0.3") is not None
    assert guard.statistics() == {"pending": 3, "established": 1, "streams": 0, "refused_connections": 2,
                                 "refused_streams": 0}
    for slot in (a1, a2, b1):
        guard.release(slot)
    assert guard.statistics()["pending"] == 1 and guard.statistics()["established"] == 0


def test_connections_per_address_count_established_ones_too():
    guard = InboundGuard(InboundLimits(max_pending_per_ip=2, max_connections_per_ip=3))
    for _ in range(3):
        guard.established(guard.admit("10.0.0.1"), object())
    assert guard.admit("10.0.0.1") is None and guard.admit("10.0.0.2") is not None


def test_streams_are_counted_per_peer():
    guard = InboundGuard(InboundLimits(max_streams_per_peer=2))
    assert guard.open_stream("p") and guard.open_stream("p") and not guard.open_stream("p")
    assert guard.open_stream("q")
    guard.close_stream("p")
    assert guard.open_stream("p")


@pytest.mark.parametrize("field", ["max_pending", "max_pending_per_ip", "max_connections_per_ip",
                                   "max_streams_per_peer", "pending_timeout_s"])
def test_limits_are_validated(field):
    with pytest.raises(ValueError, match=field):
        InboundLimits(**{field: 0})


async def ping_once(addr: str) -> None:
    """A fresh peer dials `addr`, pings on an echo stream, and goes away."""
    async with Libp2pTransport(listen=LOOPBACK) as client:
        peer = await client.dial(addr, timeout=5)
        stream = MessageStream(await client.open_stream(peer, ECHO, timeout=5), Role.CLIENT, io_timeout=5)
        assert isinstance(await stream.request(Ping(nonce=1)), Pong)


async def test_a_closed_connection_gives_its_slot_back():
    """py-libp2p 0.8.1 alone refused every peer after `max_connections - min_connections` inbound
    connections over the host's life, closed or not (here 3)."""
    config = ConnectionConfig(max_connections_per_peer=1, max_connections=3, min_connections=0, low_watermark=0,
                              high_watermark=3)
    async with Libp2pTransport(listen=LOOPBACK, connection_config=config) as node:
        node.set_handler(ECHO, echo_hop)
        for _ in range(7):
            await ping_once(node.addrs[0])
        with trio.fail_after(2):
            while node.guard.statistics()["established"]:
                await trio.sleep(0.01)


async def test_streams_past_the_limit_per_peer_are_reset():
    async with Libp2pTransport(listen=LOOPBACK, inbound_limits=InboundLimits(max_streams_per_peer=2)) as node, \
            Libp2pTransport(listen=LOOPBACK) as client:
        node.set_handler(ECHO, echo_hop)
        peer = await client.dial(node.addrs[0], timeout=5)

        async def echo_stream() -> MessageStream:
            return MessageStream(await client.open_stream(peer, ECHO, timeout=5), Role.CLIENT, io_timeout=5)

        held = [await echo_stream() for _ in range(2)]
        for stream in held:
            assert isinstance(await stream.request(Ping(nonce=1)), Pong)
        with pytest.raises((DialError, StreamClosed)):  # reset while libp2p negotiates it, or just after
            extra = await echo_stream()
            await extra.request(Ping(nonce=2))
        assert node.guard.statistics()["refused_streams"] == 1
        await held[0].aclose()  # the node's handler ends, and its stream with it: room for one more
        with trio.fail_after(3):
            while node.guard.statistics()["streams"] > 1:
                await trio.sleep(0.01)
        assert isinstance(await (await echo_stream()).request(Ping(nonce=3)), Pong)
