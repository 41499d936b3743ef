"""A node facing bad peers: every mistake gets an error reply naming it, and the node keeps serving."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from mesh.client import Client, ClientOptions
from mesh.discovery import MemoryDirectory
from mesh.memory_transport import MemoryNetwork, MemoryTransport
from mesh.transport import INFERENCE_PROTOCOL, ByteStream, MessageStream
from node.node import Node
from node.sessions import SessionLimits
from protocol import (
    Codec, CloseSession, Error, ErrorCode, Hello, OpenSession, Ping, Pong, Role, SessionOpened, Step, StepResult,
    encode_tensor,
)
from protocol.framing import encode
from shard.manifest import model_digest
from shard.sampling import SamplingParams
from shard.span import load_span

HIDDEN = 64


@pytest.fixture
async def served(checkpoint_factory):
    """A node serving blocks [0, 6) of the tiny llama with small limits, and a raw peer transport."""
    model_dir = checkpoint_factory("llama")
    network, directory = MemoryNetwork(), MemoryDirectory(trio.current_time)
    digest = model_digest(model_dir)
    node = Node(load_span(model_dir, 0, 6), "tiny", digest, wall_clock=trio.current_time, token_seconds=0.001,
                limits=SessionLimits(max_sessions=2, kv_cache_bytes=400_000, max_length=64, idle_timeout_s=5,
                                    evict_idle_s=2, compute_in_thread=False),
                allowed_peers={"peer", "user"})
    async with trio.open_nursery() as nursery:
        async with MemoryTransport.open(network, "node") as node_transport, \
                MemoryTransport.open(network, "peer") as peer, MemoryTransport.open(network, "stranger") as stranger:
            await nursery.start(node.run, node_transport, directory)
            for transport in (peer, stranger):  # where the node's record says it is, as a client learns it
                transport.add_peer_addrs("node", node_transport.addrs)
            yield {"node": node, "peer": peer, "stranger": stranger, "digest": digest, "model_dir": model_dir,
                   "network": network, "directory": directory}
            nursery.cancel_scope.cancel()


async def stream_to_node(transport) -> MessageStream:
    """An inference stream to the node, past the handshake (Hello both ways)."""
    raw = await transport.open_stream("node", INFERENCE_PROTOCOL, timeout=5)
    stream = MessageStream(raw, Role.CLIENT, io_timeout=5)
    assert isinstance(await stream.request(Hello(software="test")), Hello)
    return stream


def open_message(digest: str, session_id: str = "s1", **overrides) -> OpenSession:
    fields = dict(session_id=session_id, model_id="tiny", manifest_hash=digest, start=0, end=6, max_length=16,
                  codec=Codec.FP32)
    fields.update(overrides)
    return OpenSession(**fields)


def step(session_id: str, number: int, position: int, shape=(1, 1, HIDDEN)) -> Step:
    hidden = encode_tensor(np.zeros(shape, np.float32), Codec.FP32)
    return Step(session_id=session_id, step=number, start_position=position, hidden=hidden)


async def opened(served, session_id="s1", **overrides) -> MessageStream:
    stream = await stream_to_node(served["peer"])
    reply = await stream.request(open_message(served["digest"], session_id, **overrides))
    assert isinstance(reply, SessionOpened), reply
    return stream


async def expect_error(stream: MessageStream, code: ErrorCode, text: str, timeout: float = 5) -> Error:
    reply = await stream.receive(timeout=timeout)
    assert isinstance(reply, Error), reply
    assert reply.code == code and text in reply.reason, reply
    return reply


async def test_a_good_session_works(served):
    stream = await opened(served)
    reply = await stream.request(step("s1", 0, 0, (1, 3, HIDDEN)))
    assert isinstance(reply, StepResult) and reply.hidden.shape == (1, 3, HIDDEN)
    assert isinstance(await stream.request(Ping(nonce=7)), Pong)
    await stream.send(CloseSession(session_id="s1"))


async def test_malformed_bytes(served):
    raw = await served["peer"].open_stream("node", INFERENCE_PROTOCOL, timeout=5)
    await raw.send_all((5).to_bytes(4, "big") + b"\xc1\xc1\xc1\xc1\xc1")  # 0xc1 is never valid msgpack
    stream = MessageStream(raw, Role.CLIENT)
    await expect_error(stream, ErrorCode.MALFORMED_FRAME, "")


async def test_oversized_frame_is_refused_before_reading_it(served):
    raw = await served["peer"].open_stream("node", INFERENCE_PROTOCOL, timeout=5)
    await raw.send_all((1 << 30).to_bytes(4, "big"))  # announces 1 GiB and sends nothing more
    await expect_error(MessageStream(raw, Role.CLIENT), ErrorCode.FRAME_TOO_LARGE, str(1 << 30))


async def test_a_session_opened_without_hello_is_refused_and_others_are_served(served):
    raw = await served["peer"].open_stream("node", INFERENCE_PROTOCOL, timeout=5)
    await raw.send_all(encode(open_message(served["digest"], "s0")))  # skips the handshake
    await expect_error(MessageStream(raw, Role.CLIENT), ErrorCode.UNEXPECTED_MESSAGE, "Hello comes first")
    assert "s0" not in served["node"].manager.sessions
    stream = await opened(served)  # a client that greets first is served as before
    await stream.send(CloseSession(session_id="s1"))


async def test_wrong_hidden_size(served):
    stream = await opened(served)
    await stream.send(step("s1", 0, 0, (1, 2, HIDDEN + 1)))
    await expect_error(stream, ErrorCode.INVALID_TENSOR, str(HIDDEN))


async def test_step_for_an_unknown_session_id(served):
    stream = await opened(served)
    # our own state machine would refuse to send this, so bypass it with a second connection's bytes
    raw_bytes = MessageStream(stream.raw, Role.CLIENT)
    raw_bytes.connection.machine.session_id = "other"
    raw_bytes.connection.machine.state = stream.connection.machine.state
    await raw_bytes.send(step("other", 0, 0))
    await expect_error(stream, ErrorCode.UNEXPECTED_MESSAGE, "other")


async def test_step_before_open(served):
    stream = await stream_to_node(served["peer"])
    stream.connection.machine.state = stream.connection.machine.state.OPEN  # lie to our own checks
    await stream.send(step("s1", 0, 0))
    await expect_error(stream, ErrorCode.UNEXPECTED_MESSAGE, "Step here: state is idle")


async def test_step_numbers_must_increase(served):
    stream = await opened(served)
    assert isinstance(await stream.request(step("s1", 3, 0)), StepResult)
    stream.connection.machine.last_step = None
    await stream.send(step("s1", 2, 1))
    await expect_error(stream, ErrorCode.UNEXPECTED_MESSAGE, "step 2")


async def test_position_ahead_of_the_cache(served):
    stream = await opened(served)
    await stream.send(step("s1", 0, 5))
    await expect_error(stream, ErrorCode.POSITION_MISMATCH, "position 5")


async def test_wrong_model(served):
    stream = await stream_to_node(served["peer"])
    await stream.send(open_message("0" * 64))
    reply = await expect_error(stream, ErrorCode.MODEL_MISMATCH, "not 0000")
    assert reply.retry_elsewhere


async def test_blocks_not_served(served):
    stream = await stream_to_node(served["peer"])
    await stream.send(open_message(served["digest"], start=2, end=9))
    await expect_error(stream, ErrorCode.SPAN_NOT_SERVED, "[2, 9)")


async def test_too_long_a_session(served):
    stream = await stream_to_node(served["peer"])
    await stream.send(open_message(served["digest"], max_length=65))
    await expect_error(stream, ErrorCode.INVALID_MESSAGE, "max_length 65")


async def test_session_limits_and_kv_budget(served):
    first, second = await opened(served, "s1"), await opened(served, "s2")
    third = await stream_to_node(served["peer"])
    await third.send(open_message(served["digest"], "s3"))
    await expect_error(third, ErrorCode.OVERLOADED, "2 session slots")
    await first.send(CloseSession(session_id="s1"))
    await second.send(CloseSession(session_id="s2"))
    big = await stream_to_node(served["peer"])
    await big.send(open_message(served["digest"], "s4", max_length=64, batch_size=8))
    await expect_error(big, ErrorCode.CACHE_FULL, "bytes of KV cache")


async def test_peer_not_on_the_allow_list(served):
    """Refused before the node reads a byte of it: the stranger's Hello gets the error."""
    raw = await served["stranger"].open_stream("node", INFERENCE_PROTOCOL, timeout=5)
    reply = await MessageStream(raw, Role.CLIENT, io_timeout=5).request(Hello(software="test"))
    assert isinstance(reply, Error) and reply.code == ErrorCode.OVERLOADED and "stranger" in reply.reason


async def test_idle_session_expires(served, autojump_clock):
    stream = await opened(served)
    await expect_error(stream, ErrorCode.SESSION_EXPIRED, "idle for 5 s", timeout=30)
    with trio.fail_after(1):  # the node frees the session right after its reply
        while served["node"].manager.sessions:
            await trio.sleep(0.01)


async def test_node_keeps_serving_after_bad_peers(served):
    bad = await served["peer"].open_stream("node", INFERENCE_PROTOCOL, timeout=5)
    await bad.send_all(b"\x00\x00\x00\x02\x92\x01")  # a msgpack array, not a map
    async with MemoryTransport.open(served["network"], "user") as transport:
        client = Client(transport, served["directory"], served["model_dir"], options=ClientOptions(codec=Codec.FP32))
        report = await client.generate_text(prompt_ids=[3, 4, 5], params=SamplingParams(max_new_tokens=3))
    assert len(report.token_ids) == 3


async def test_shutdown_tells_open_sessions_to_go_elsewhere(served):
    stream = await opened(served)
    served["node"].stop()
    reply = await expect_error(stream, ErrorCode.SHUTTING_DOWN, "elsewhere")
    assert reply.retry_elsewhere
    assert await served["directory"].lookup(served["digest"]) == []
    fresh = await stream_to_node(served["peer"])
    await fresh.send(open_message(served["digest"], "s9"))
    assert (await expect_error(fresh, ErrorCode.SHUTTING_DOWN, "go elsewhere")).retry_elsewhere


async def test_idle_session_is_evicted_to_make_room_and_told_to_replay_elsewhere(served, autojump_clock):
    first = await opened(served, "s1", max_length=64, batch_size=3)  # 295 kB of the 400 kB budget
    await trio.sleep(3)  # idle past evict_idle_s (2 s), not yet expired (5 s)
    second = await opened(served, "s2", max_length=64, batch_size=2)  # 197 kB: fits only if s1 goes
    reply = await expect_error(first, ErrorCode.CACHE_FULL, "evicted")
    assert reply.retry_elsewhere
    result = await second.request(step("s2", 0, 0, (2, 1, HIDDEN)))
    assert isinstance(result, StepResult), result


class _ScriptedPeer(ByteStream):
    """A peer that sends `frames`, then reads nothing: every write after the first `writes` hangs."""

    peer_id = "peer"

    def __init__(self, frames: list[bytes], writes: int):
        self._incoming, self._writes, self.written = b"".join(frames), writes, 0

    async def send_all(self, data: bytes) -> None:
        if self.written >= self._writes:
            await trio.sleep_forever()  # a peer that stopped reading: the write never completes
        self.written += 1

    async def receive_some(self, max_bytes: int) -> bytes:
        if not self._incoming:
            await trio.sleep_forever()  # nothing more comes
        data, self._incoming = self._incoming[:max_bytes], self._incoming[max_bytes:]
        return data

    async def aclose(self) -> None:
        pass


async def test_an_answer_the_peer_never_takes_times_out_and_frees_the_session(served, autojump_clock):
    """The node's answer to a step is bounded by its I/O timeout like any write."""
    node = served["node"]
    frames = [encode(Hello(software="test")), encode(open_message(served["digest"], "s1")), encode(step("s1", 0, 0))]
    peer = _ScriptedPeer(frames, writes=2)  # takes the node's Hello and SessionOpened, then never the step's result
    started = trio.current_time()
    with trio.fail_after(node.server.io_timeout + 5):
        await node.server.handle_inference(peer)
    assert trio.current_time() - started >= node.server.io_timeout
    assert node.manager.sessions == {} and node.manager.reserved_bytes == 0
