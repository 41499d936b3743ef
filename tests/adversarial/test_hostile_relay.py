"""Attacks on a relay and on the dial-back check that now fail (docs/security.md, "Relays")."""

from __future__ import annotations

import pytest
import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeer
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from mesh.errors import DialError
from mesh.libp2p_transport import Libp2pTransport
from mesh.reachability import DialBack, ask_dial_back
from mesh.transport import RelayLimits
from tests.mesh.conftest import LOOPBACK

pytestmark = pytest.mark.timeout(60)


async def reserve_in_the_name_of(attacker: Libp2pTransport, relay: Libp2pTransport, victim: str) -> int:
    """A RESERVE whose peer field names `victim`, sent by `attacker`; the relay's status code."""
    stream = await attacker.host.new_stream(ID.from_base58(relay.peer_id), [HOP_PROTOCOL])
    try:
        await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE,
                                                     peer=CircuitPeer(id=ID.from_base58(victim).to_bytes())))
        with trio.fail_after(5):
            return (await read_delimited_msg(stream, HopMessage)).status
    finally:
        await stream.close()


async def test_a_slot_asked_for_in_another_peers_name_goes_to_the_asker() -> None:
    async with Libp2pTransport(listen=LOOPBACK) as relay, Libp2pTransport(listen=LOOPBACK) as attacker, \
            Libp2pTransport(listen=LOOPBACK) as victim:
        relay.offer_relay(RelayLimits(max_reservations=1))
        await attacker.dial(relay.addrs[0], timeout=5)
        assert await reserve_in_the_name_of(attacker, relay, victim.peer_id) == StatusCode.OK
        manager = relay.relaying.protocol.resource_manager
        assert manager.has_reservation(ID.from_base58(attacker.peer_id))
        assert not manager.has_reservation(ID.from_base58(victim.peer_id))


async def test_one_address_cannot_take_every_slot() -> None:
    limits = RelayLimits(max_reservations=16, max_reservations_per_ip=2)
    async with Libp2pTransport(listen=LOOPBACK) as relay:
        relay.offer_relay(limits)
        peers = [Libp2pTransport(listen=LOOPBACK) for _ in range(3)]
        async with peers[0], peers[1], peers[2]:
            for peer in peers:
                await peer.dial(relay.addrs[0], timeout=5)
            for peer in peers[:2]:
                await peer.reserve(relay.peer_id, timeout=5)
            with pytest.raises(DialError, match="refused"):
                await peers[2].reserve(relay.peer_id, timeout=5)  # all three come from 127.0.0.1


async def test_a_dial_back_is_never_aimed_at_a_third_party() -> None:
    """The asker names another peer's address, or an address at another IP: refused, or answered
    "not reached" without a dial."""
    async with Libp2pTransport(listen=LOOPBACK) as asker, Libp2pTransport(listen=LOOPBACK) as helper, \
            Libp2pTransport(listen=LOOPBACK) as third:
        dialled = []
        real = helper.dial_back

        async def recording(addr: str, *, timeout: float) -> bool:
            dialled.append(addr)
            return await real(addr, timeout=timeout)

        helper.dial_back = recording
        DialBack(helper).install()
        await asker.dial(helper.addrs[0], timeout=5)
        with pytest.raises(DialError, match="not a direct address of the asking peer"):
            await ask_dial_back(asker, helper.peer_id, third.addrs)
        elsewhere = f"/ip4/10.1.2.3/tcp/{third.addrs[0].split('/')[4]}/p2p/{asker.peer_id}"
        answer = await ask_dial_back(asker, helper.peer_id, [elsewhere])
        assert not answer.reached and dialled == []
