"""The data channel's listener and offers under attack (issue 18, items 7 and 8), over real TCP on
loopback (127.0.0.2 plays another host: Linux routes all of 127/8 to lo).

- A flood of idle connections from one address: all but `MAX_PENDING_PER_IP` are closed at once,
  and an honest client's channel still binds while the flood stays open.
- A hostile node naming another service as its data channel: the client dials only the host it
  reached the node at, and the bytes it writes in clear are random, never the node's chosen token.
"""

from __future__ import annotations

import pytest
import trio

from mesh import data_channel
from mesh.data_channel import MAX_PENDING_PER_IP, DataChannels, Offer, check_offered_host

FLOOD = 200


async def is_closed(stream: trio.SocketStream) -> bool:
    """Whether the node closed this connection within 2 s (else it holds it, pending)."""
    with trio.move_on_after(2.0):
        try:
            return await stream.receive_some(1) == b""
        except trio.BrokenResourceError:
            return True
    return False


async def test_a_flood_of_idle_connections_is_shed_and_an_honest_channel_still_binds(nursery):
    channels = DataChannels("127.0.0.1")
    await nursery.start(channels.serve)
    offer, arrival = channels.offer("honest-peer")
    host, port = offer.address.rsplit(":", 1)
    flood = [await trio.open_tcp_stream(host, int(port), local_address="127.0.0.2") for _ in range(FLOOD)]
    closed = []

    async def check(stream):
        closed.append(await is_closed(stream))

    async with trio.open_nursery() as checks:
        for stream in flood:
            checks.start_soon(check, stream)
    assert closed.count(False) == MAX_PENDING_PER_IP  # held, pending; the other 192 closed unread

    honest = await data_channel.connect(offer, "node-peer", timeout=5)  # from 127.0.0.1, while the flood is open
    with trio.fail_after(5):
        bound = await arrival.receive()
    await honest.send_all(b"step")
    assert await bound.receive_some(10) == b"step"
    for stream in flood:
        await stream.aclose()


async def test_with_no_offer_waiting_every_connection_is_closed_unread(nursery):
    channels = DataChannels("127.0.0.1")
    await nursery.start(channels.serve)
    stream = await trio.open_tcp_stream("127.0.0.1", channels.port)
    assert await is_closed(stream)


@pytest.mark.parametrize("offered, reached, allowed", [
    ("127.0.0.1:6379", "192.168.1.20", False),  # a node on the LAN aiming us at our own Redis
    ("192.168.1.99:4001", "192.168.1.20", False),  # ... or at another host of the LAN
    ("192.168.1.20:40123", "192.168.1.20", True),
    ("[fe80::1]:40123", "fe80::1", True),
    ("10.0.0.5:4001", None, False),  # in-memory transports: loopback only
    ("127.0.0.1:40123", None, True),
    ("example.org:80", "192.168.1.20", False),  # names are never resolved
])
def test_the_client_dials_only_the_host_it_reached_the_node_at(offered, reached, allowed):
    if allowed:
        check_offered_host(offered, reached)
    else:
        with pytest.raises(ValueError):
            check_offered_host(offered, reached)


async def test_a_node_cannot_choose_the_bytes_the_client_writes_in_clear(nursery):
    """A "service" on loopback records what a client connecting to it writes before any record."""
    received = []

    async def service(stream):
        data = b""
        with trio.move_on_after(2):
            while len(data) < 32:
                chunk = await stream.receive_some(64)
                if not chunk:
                    break
                data += chunk
        received.append(data[:32])

    listeners = await nursery.start(trio.serve_tcp, service, 0)
    port = listeners[0].socket.getsockname()[1]
    chosen = b"FLUSHALL\r\nQUIT\r\n"  # 16 bytes a hostile node would like written to the service
    offer = Offer(f"127.0.0.1:{port}", chosen, bytes(32))
    for _ in range(2):
        stream = await data_channel.connect(offer, "hostile-node", timeout=5)
        await stream.aclose()
    with trio.fail_after(5):
        while len(received) < 2:
            await trio.sleep(0.01)
    assert all(chosen not in data for data in received) and received[0] != received[1]  # random, per connection
