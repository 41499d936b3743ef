"""The client's side of an inference session: one stream per hop, hidden states sent hop by hop.

A `HopSession` is the session on one node for blocks [start, end); it keeps every input it sent
(the hop's history) so a replacement can be brought to the same state. A `PipelineSession` chains
the hops of a route and runs one step through all of them.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field

import numpy as np
import trio

from mesh.data_channel import CAPABILITY as DATA_CHANNEL, Offer, connect as connect_data_channel
from mesh.errors import TransportError
from mesh.transport import INFERENCE_PROTOCOL, MessageStream, Transport
from protocol import (
    Codec, CloseSession, Error, ErrorCode, Hello, OpenSession, ProtocolError, Role, SessionOpened,
    Step, StepResult, decode_tensor, encode_tensor,
)

log = logging.getLogger("hearth.client")

CLIENT_SOFTWARE = "hearth-client/0.1"
DATA_CHANNEL_TIMEOUT_S = 2.0


BUSY = frozenset({ErrorCode.OVERLOADED, ErrorCode.CACHE_FULL})  # refusals of a node that is full, not broken


class HopFailed(Exception):
    """A hop cannot continue: its peer vanished, timed out, refused, or answered nonsense."""

    def __init__(self, peer_id: str, start: int, end: int, reason: str, *, retry_elsewhere: bool = True,
                 busy: bool = False):
        self.peer_id, self.start, self.end = peer_id, start, end
        self.reason, self.retry_elsewhere = reason, retry_elsewhere
        self.busy = busy  # the node is healthy but full (sessions, KV cache): worth asking again soon
        super().__init__(f"hop {peer_id} for blocks [{start}, {end}) failed: {reason}")


@dataclass
class StepRecord:
    start_position: int
    hidden: np.ndarray  # the input sent, [B, T, D] float32


@dataclass
class HopSession:
    peer_id: str
    start: int
    end: int
    stream: MessageStream
    session_id: str
    codec: Codec
    step_number: int = 0
    history: list[StepRecord] = field(default_factory=list)
    compute_seconds: float = 0.0  # the node's compute, as it reports it
    wall_seconds: float = 0.0  # our round trips, compute included
    replays_chunks: bool = False  # the node runs a multi-step replay chunk by chunk (Step.chunks)

    @property
    def length(self) -> int:
        return sum(record.hidden.shape[1] for record in self.history)

    async def step(self, hidden: np.ndarray, start_position: int, *, timeout: float, replay: bool = False,
                   chunks: tuple[int, ...] = ()) -> np.ndarray:
        """Send `hidden` [B, T, D] at `start_position` (as `chunks` of the original steps, when
        replaying several at once); the hop's output. Raises HopFailed."""
        message = Step(session_id=self.session_id, step=self.step_number, start_position=start_position,
                       hidden=encode_tensor(hidden, self.codec), replay=replay, chunks=chunks)
        started = trio.current_time()
        try:
            reply = await self.stream.request(message, timeout=timeout)
        except (TransportError, ProtocolError) as err:
            raise HopFailed(self.peer_id, self.start, self.end, str(err)) from err
        self.step_number += 1
        if isinstance(reply, Error):
            raise HopFailed(self.peer_id, self.start, self.end, f"node says: {reply.reason}",
                            retry_elsewhere=reply.retry_elsewhere, busy=reply.code in BUSY)
        if not isinstance(reply, StepResult):
            raise HopFailed(self.peer_id, self.start, self.end, f"expected step_result, got {reply.TYPE}")
        try:
            output = decode_tensor(reply.hidden).astype(np.float32, copy=False)
        except ProtocolError as err:
            raise HopFailed(self.peer_id, self.start, self.end, f"bad step result: {err}") from err
        if output.shape != hidden.shape:
            raise HopFailed(self.peer_id, self.start, self.end,
                            f"step result has shape {list(output.shape)}, sent {list(hidden.shape)}")
        # replayed inputs too, in their original chunks: a later failover replays them again
        if len(chunks) <= 1:
            self.history.append(StepRecord(start_position, hidden))
        else:
            offsets = np.cumsum((0, *chunks))
            self.history.extend(StepRecord(start_position + int(a), hidden[:, a:b]) for a, b in zip(offsets, offsets[1:]))
        self.compute_seconds += reply.compute_seconds
        self.wall_seconds += trio.current_time() - started
        return output

    async def close(self) -> None:
        with trio.move_on_after(1.0):
            try:
                await self.stream.send(CloseSession(session_id=self.session_id), timeout=1.0)
            except (TransportError, ProtocolError):
                pass
        await self.stream.aclose()


async def open_hop(transport: Transport, peer_id: str, start: int, end: int, *, model_id: str,
                   manifest_hash: str, max_length: int, batch: int, codec: Codec, timeout: float,
                   io_timeout: float, data_channel: bool = True) -> HopSession:
    """Open a session for blocks [start, end) on `peer_id`; its steps go over the node's data
    channel when it offers one that this client can reach. Raises HopFailed."""
    session_id = secrets.token_hex(8)
    capabilities = (DATA_CHANNEL,) if data_channel else ()
    try:
        with trio.fail_after(timeout):
            raw = await transport.open_stream(peer_id, INFERENCE_PROTOCOL, timeout=timeout)
            stream = MessageStream(raw, Role.CLIENT, io_timeout=io_timeout)
            hello = await stream.request(Hello(software=CLIENT_SOFTWARE, codecs=tuple(Codec),
                                               capabilities=capabilities), timeout=timeout)
            if isinstance(hello, Hello) and codec not in hello.codecs:
                codec = Codec.FP32
            replays_chunks = isinstance(hello, Hello) and "replay-chunks" in hello.capabilities
            reply = await stream.request(OpenSession(
                session_id=session_id, model_id=model_id, manifest_hash=manifest_hash, start=start, end=end,
                max_length=max_length, batch_size=batch, codec=codec), timeout=timeout)
    except trio.TooSlowError as err:
        raise HopFailed(peer_id, start, end, f"no session within {timeout:g} s") from err
    except (TransportError, ProtocolError) as err:
        raise HopFailed(peer_id, start, end, str(err)) from err
    if isinstance(reply, Error):
        await stream.aclose()
        raise HopFailed(peer_id, start, end, f"node refused: {reply.reason}", retry_elsewhere=reply.retry_elsewhere,
                        busy=reply.code in BUSY)
    if not isinstance(reply, SessionOpened):
        await stream.aclose()
        raise HopFailed(peer_id, start, end, f"expected session_opened, got {reply.TYPE}")
    if data_channel and reply.data_address:
        stream = await _to_data_channel(stream, reply, timeout=min(timeout, DATA_CHANNEL_TIMEOUT_S))
    return HopSession(peer_id, start, end, stream, session_id, codec, replays_chunks=replays_chunks)


async def _to_data_channel(stream: MessageStream, opened: SessionOpened, *, timeout: float) -> MessageStream:
    """The session continued on the data channel the node offered, or on `stream` if it cannot be reached."""
    offer = Offer(opened.data_address, opened.data_token, opened.data_key)
    try:
        sealed = await connect_data_channel(offer, stream.peer_id, timeout=timeout)
    except (TransportError, ValueError) as err:
        log.info("data channel to %s unreachable (%s); staying on libp2p", stream.peer_id, err)
        return stream
    await stream.aclose()
    return stream.moved_to(sealed)
