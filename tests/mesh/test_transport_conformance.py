"""One suite, two transports: what every `Transport` must do, in-memory and over libp2p."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import trio

from mesh.errors import DialError, StreamClosed, TransportTimeout
from mesh.transport import MessageStream
from protocol import CloseSession, Codec, Hello, OpenSession, Ping, Pong, Role, SessionOpened, Step, StepResult, encode_tensor
from tests.mesh.conftest import ECHO, IO_TIMEOUT, echo_hop

pytestmark = pytest.mark.timeout(60)
DIAL_TIMEOUT = 5.0


async def connect(client, server, protocol=ECHO) -> MessageStream:
    peer_id = await client.dial(server.addrs[0], timeout=DIAL_TIMEOUT)
    assert peer_id == server.peer_id
    raw = await client.open_stream(peer_id, protocol, timeout=DIAL_TIMEOUT)
    return MessageStream(raw, Role.CLIENT, io_timeout=IO_TIMEOUT)


async def test_addrs_end_in_own_peer_id(kit):
    async with kit.transport() as peer:
        assert peer.addrs
        assert all(addr.endswith(f"/p2p/{peer.peer_id}") for addr in peer.addrs)


async def test_open_stream_and_echo(kit):
    async with kit.transport() as client, kit.transport() as server:
        server.set_handler(ECHO, echo_hop)
        stream = await connect(client, server)
        assert stream.peer_id == server.peer_id
        assert await stream.request(Ping(nonce=7)) == Pong(nonce=7)
        await stream.aclose()


async def test_many_round_trips_on_one_stream(kit):
    async with kit.transport() as client, kit.transport() as server:
        server.set_handler(ECHO, echo_hop)
        stream = await connect(client, server)
        for nonce in range(500):
            assert await stream.request(Ping(nonce=nonce)) == Pong(nonce=nonce)


async def test_8_mib_tensor_in_one_frame(kit):
    """Exercises the exact-read path: the frame arrives in many partial reads."""
    hidden = np.random.default_rng(0).standard_normal((1, 2048, 1024), dtype=np.float32)  # 8 MiB
    async with kit.transport() as client, kit.transport() as server:
        server.set_handler(ECHO, echo_hop)
        stream = await connect(client, server)
        assert isinstance(await stream.request(Hello(software="client")), Hello)
        opened = await stream.request(OpenSession(session_id="s", model_id="m", manifest_hash="h",
                                                  start=0, end=1, max_length=4096))
        assert opened == SessionOpened(session_id="s")
        tensor = encode_tensor(hidden, Codec.FP32)
        assert len(tensor.data) == 8 << 20
        result = await stream.request(Step(session_id="s", step=0, start_position=0, hidden=tensor))
        assert isinstance(result, StepResult) and result.hidden == tensor
        await stream.send(CloseSession(session_id="s"))


async def test_concurrent_streams(kit):
    async with kit.transport() as client, kit.transport() as server:
        server.set_handler(ECHO, echo_hop)
        peer_id = await client.dial(server.addrs[0], timeout=DIAL_TIMEOUT)

        async def converse(index: int) -> None:
            raw = await client.open_stream(peer_id, ECHO, timeout=DIAL_TIMEOUT)
            stream = MessageStream(raw, Role.CLIENT, io_timeout=IO_TIMEOUT)
            for round_trip in range(20):
                nonce = index * 1000 + round_trip
                assert await stream.request(Ping(nonce=nonce)) == Pong(nonce=nonce)
            await stream.aclose()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for index in range(50):
                    nursery.start_soon(converse, index)


async def test_peer_closing_its_side_ends_the_stream(kit):
    async def answer_once_then_close(raw):
        stream = MessageStream(raw, Role.HOP, io_timeout=IO_TIMEOUT)
        message = await stream.receive()
        await stream.send(Pong(nonce=message.nonce))
        await raw.aclose()

    async with kit.transport() as client, kit.transport() as server:
        server.set_handler(ECHO, answer_once_then_close)
        stream = await connect(client, server)
        assert await stream.request(Ping(nonce=1)) == Pong(nonce=1)
        with trio.fail_after(5), pytest.raises(StreamClosed):
            await stream.receive()
        assert await stream.raw.receive_some(100) == b""  # end of stream, not a reset


async def test_peer_transport_exit_ends_the_stream_quickly(kit):
    stop = trio.Event()

    async def run_server(task_status=trio.TASK_STATUS_IGNORED):
        async with kit.transport() as server:
            server.set_handler(ECHO, echo_hop)
            task_status.started(server)
            await stop.wait()

    async with kit.transport() as client, trio.open_nursery() as nursery:
        server = await nursery.start(run_server)
        stream = await connect(client, server)
        assert await stream.request(Ping(nonce=1)) == Pong(nonce=1)
        stop.set()
        with trio.fail_after(3), pytest.raises(StreamClosed):
            await stream.receive()


async def test_unknown_protocol_is_a_dial_error(kit):
    async with kit.transport() as client, kit.transport() as server:
        server.set_handler(ECHO, echo_hop)
        peer_id = await client.dial(server.addrs[0], timeout=DIAL_TIMEOUT)
        with trio.fail_after(DIAL_TIMEOUT + 1), pytest.raises(DialError) as caught:
            await client.open_stream(peer_id, "/hearth/no-such-protocol/1", timeout=DIAL_TIMEOUT)
        assert server.peer_id in str(caught.value)


async def test_dial_to_address_nobody_listens_on_fails_within_timeout(kit):
    async with kit.transport() as client:
        addr = kit.unreachable_addr()
        started = trio.current_time()
        with pytest.raises(DialError) as caught:
            await client.dial(addr, timeout=2.0)
        assert trio.current_time() - started < 3.0
        assert addr in str(caught.value)


async def test_receive_timeout_is_a_transport_timeout(kit):
    async def silent(raw):
        with contextlib.suppress(StreamClosed):
            await raw.receive_some(100)  # until the client gives up

    async with kit.transport() as client, kit.transport() as server:
        server.set_handler(ECHO, silent)
        stream = await connect(client, server)
        started = trio.current_time()
        with pytest.raises(TransportTimeout) as caught:
            await stream.receive(timeout=0.3)
        assert 0.25 < trio.current_time() - started < 2.0
        assert caught.value.peer_id == server.peer_id
