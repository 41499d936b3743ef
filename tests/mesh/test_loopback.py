"""`LoopbackTransport`: a libp2p peer opening streams to itself runs its own handlers in memory."""

from __future__ import annotations

import pytest
import trio

from mesh.errors import DialError
from mesh.libp2p_transport import Libp2pTransport
from mesh.loopback import LoopbackTransport
from mesh.transport import MessageStream
from protocol import Ping, Pong, Role
from tests.mesh.conftest import ECHO, IO_TIMEOUT, LOOPBACK, echo_hop


async def test_a_peer_reaches_its_own_handlers_and_others_through_libp2p():
    async with Libp2pTransport(listen=LOOPBACK) as inner, Libp2pTransport(listen=LOOPBACK) as other:
        other.set_handler(ECHO, echo_hop)
        with pytest.raises(DialError):  # why the loopback exists: libp2p cannot dial its own host
            await inner.open_stream(inner.peer_id, ECHO, timeout=IO_TIMEOUT)
        async with LoopbackTransport.wrap(inner) as transport:
            transport.set_handler(ECHO, echo_hop)
            transport.add_peer_addrs(other.peer_id, other.addrs)
            assert (transport.peer_id, transport.addrs) == (inner.peer_id, inner.addrs)
            for nonce, peer in enumerate([transport.peer_id, other.peer_id, transport.peer_id]):
                with trio.fail_after(IO_TIMEOUT):
                    stream = MessageStream(await transport.open_stream(peer, ECHO, timeout=IO_TIMEOUT), Role.CLIENT)
                    assert await stream.request(Ping(nonce=nonce)) == Pong(nonce=nonce)
                    await stream.aclose()
