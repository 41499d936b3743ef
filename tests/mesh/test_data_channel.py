"""The sealed TCP data channel: handshake, records, and everything that must close it."""

from __future__ import annotations

import socket
import struct

import pytest
import trio

from mesh import data_channel
from mesh.data_channel import MAX_RECORD_BYTES, DataChannels, Offer, SealedStream
from mesh.errors import DialError, StreamClosed

pytestmark = pytest.mark.trio


@pytest.fixture
async def channels(nursery):
    listener = DataChannels("127.0.0.1")
    await nursery.start(listener.serve)
    return listener


async def bound_pair(channels: DataChannels) -> tuple[SealedStream, SealedStream]:
    offer, arrival = channels.offer("client-peer")
    client = await data_channel.connect(offer, "node-peer", timeout=5)
    with trio.fail_after(5):
        node = await arrival.receive()
    return client, node


async def hung_up(stream: SealedStream) -> None:
    """The node closed the connection: end of stream (or a reset) within a few seconds."""
    with trio.fail_after(5):
        try:
            assert await stream.receive_some(10) == b""
        except StreamClosed:
            pass


async def test_records_flow_both_ways_and_large_writes_are_split(channels):
    client, node = await bound_pair(channels)
    assert node.peer_id == "client-peer" and client.peer_id == "node-peer"
    await client.send_all(b"step")
    assert await node.receive_some(100) == b"step"
    big = bytes(range(256)) * (MAX_RECORD_BYTES // 256 + 100)  # more than one record
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.send_all, big)
        received = bytearray()
        while len(received) < len(big):
            received += await client.receive_some(1 << 16)
    assert bytes(received) == big
    await client.aclose()
    assert await node.receive_some(100) == b""  # a clean end between records


async def test_an_offer_binds_once(channels):
    offer, arrival = channels.offer("p")
    await data_channel.connect(offer, "n", timeout=5)
    await arrival.receive()
    try:  # the token is spent (and no other offer waits): the node hangs up, perhaps before the client wrote
        second = await data_channel.connect(offer, "n", timeout=5)
    except DialError:
        return
    await hung_up(second)


async def test_a_client_without_the_key_is_refused(channels):
    offer, arrival = channels.offer("p")
    forged = Offer(offer.address, offer.token, bytes(32))
    stream = await data_channel.connect(forged, "n", timeout=5)
    await hung_up(stream)
    with pytest.raises(trio.WouldBlock):
        arrival.receive_nowait()


async def test_an_unknown_token_and_garbage_are_refused(channels):
    host, port = channels.address.rsplit(":", 1)
    for junk in (b"\x00" * 16 + b"\xff\xff\xff\xff", b"GET / HTTP/1.1\r\n\r\n", b""):
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(junk)
        with trio.fail_after(data_channel.HANDSHAKE_TIMEOUT_S + 1):
            try:
                while await stream.receive_some(10):
                    pass
            except trio.BrokenResourceError:
                pass  # closed with our junk unread: a reset
        await stream.aclose()


async def test_a_tampered_or_oversized_record_closes_the_stream(channels):
    client, node = await bound_pair(channels)
    raw = client._socket
    sealed = client._aead.encrypt(client._nonce(data_channel.TO_NODE, client._sent), b"hello", None)
    await raw.send_all(struct.pack(">I", len(sealed)) + sealed[:-1] + bytes([sealed[-1] ^ 1]))
    with pytest.raises(StreamClosed, match="authentication"):
        await node.receive_some(10)

    client, node = await bound_pair(channels)
    await client._socket.send_all(struct.pack(">I", MAX_RECORD_BYTES + 1000))
    with pytest.raises(StreamClosed, match="record of"):
        await node.receive_some(10)


async def test_a_replayed_record_fails_authentication(channels):
    client, node = await bound_pair(channels)
    captured = []
    send = client._socket.send_all

    async def tap(data):
        captured.append(bytes(data))
        await send(data)

    client._socket.send_all = tap
    await client.send_all(b"once")
    assert await node.receive_some(10) == b"once"
    await send(captured[0])  # the same record again: its nonce is used up
    with pytest.raises(StreamClosed, match="authentication"):
        await node.receive_some(10)


async def test_connecting_to_nothing_is_a_dial_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DialError):
        await data_channel.connect(Offer(f"127.0.0.1:{port}", bytes(16), bytes(32)), "n", timeout=5)


async def test_a_wildcard_listener_offers_each_client_the_address_it_reached_the_node_on():
    channels = DataChannels("0.0.0.0", advertise_host="10.77.0.1")
    channels.port = 5555
    assert channels.offer("p", reached_on="10.78.0.1")[0].address == "10.78.0.1:5555"  # a host on two LANs
    assert channels.offer("p")[0].address == "10.77.0.1:5555"  # not known: the advertised one
    assert channels.offer("p", reached_on="fd00::1")[0].address == "10.77.0.1:5555"  # another family
    specific = DataChannels("10.77.0.1")
    specific.port = 5555
    assert specific.offer("p", reached_on="127.0.0.1")[0].address == "10.77.0.1:5555"  # it binds only that one
