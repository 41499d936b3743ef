"""The client's side of an inference session: one stream per hop, hidden states sent hop by hop.

A `HopSession` is the session on one node for blocks [start, end); it keeps every input it sent
(the hop's history) so a replacement can be brought to the same state. `open_hop` holds the
client's half of the conversation (`protocol.conversation`): Hello both ways, the codec for the
session (an explicit one, or with `AUTO` the one `protocol.session_codec` finds cheapest for the
link that the hop's `LinkBook` entry has measured), then OpenSession. `mesh.pipeline.RoutePipeline`
chains the hops of a route, runs each step through all of them, and replaces hops that fail.
"""

from __future__ import annotations

import collections
import logging
import secrets
from dataclasses import dataclass, field

import numpy as np
import trio

from mesh.data_channel import Offer, check_offered_host, connect as connect_data_channel
from mesh.errors import StreamClosed, TransportError
from mesh.swarm_secret import SwarmSecret, proof_of, refusal_reason
from mesh.transport import MessageStream, PathKind, Transport
from protocol import (
    CAPABILITIES, CHUNK_INVARIANT, DATA_CHANNEL, INFERENCE_PROTOCOL, REFERENCE_SPEEDS, REWIND_STEPS, REPLAY_CHUNKS,
    CloseSession, Codec, Error,
    Exchange, Hello, LinkEstimate, Message, OpenSession, ProtocolError, Retry, Role, SessionOpened, Step, StepResult,
    WireTensor,
    classify, decode_tensor, encode_tensor, estimate_link, session_codec,
)
from shard.interfaces import ROW_EXACT_TOKENS

log = logging.getLogger("hearth.client")

CLIENT_SOFTWARE = "hearth-client/0.1"
DATA_CHANNEL_TIMEOUT_S = 2.0


class HopFailed(Exception):
    """A hop cannot continue: its peer vanished, timed out, refused, or answered nonsense. `retry`
    (`protocol.Retry`) says whether another peer can help, and whether this one is merely busy."""

    def __init__(self, peer_id: str, start: int, end: int, reason: str, *, retry: Retry = Retry.ELSEWHERE,
                 relay_lost: bool = False):
        self.peer_id, self.start, self.end = peer_id, start, end
        self.reason, self.retry = reason, retry
        self.relay_lost = relay_lost  # the stream ran through a relay and broke: the way failed, maybe not the peer
        super().__init__(f"hop {peer_id} for blocks [{start}, {end}) failed: {reason}")

    @property
    def retry_elsewhere(self) -> bool:
        return self.retry.retry_elsewhere

    @property
    def busy(self) -> bool:
        """The node is healthy but full (sessions, KV cache): worth asking again soon."""
        return self.retry.busy


class LinkBook:
    """The exchanges a client timed with each peer (probes, steps), for `protocol.estimate_link`:
    per peer and size (a power of two of bytes), the last `per_size` of them."""

    def __init__(self, *, per_size: int = 8, max_peers: int = 1 << 14):
        self.per_size, self.max_peers = per_size, max_peers
        self._peers: dict[str, dict[int, collections.deque[Exchange]]] = {}

    def record(self, peer_id: str, exchange: Exchange) -> None:
        if peer_id not in self._peers and len(self._peers) >= self.max_peers:
            self._peers.clear()  # a client that met this many peers starts over
        sizes = self._peers.setdefault(peer_id, {})
        sizes.setdefault(exchange.wire_bytes.bit_length(), collections.deque(maxlen=self.per_size)).append(exchange)

    def estimate(self, peer_id: str) -> LinkEstimate | None:
        sizes = self._peers.get(peer_id, {})
        return estimate_link(exchange for recent in sizes.values() for exchange in recent)


@dataclass
class HopTimes:
    """Where a hop's timed round trips went besides the node's compute, summed over its steps
    (seconds). What is left of the round trips is the way between: sealing, the kernel, waking up
    each side, and the framing of the node's answer."""

    send: float = 0.0  # the step built, encoded and framed here, until its bytes went to the stream
    node_before: float = 0.0  # the node from the step's bytes arriving until it had the output, less compute
    node_after: float = 0.0  # the node from then until its answer's tensor was encoded
    receive: float = 0.0  # the answer's bytes read here until its output was checked and decoded


@dataclass
class StepRecord:
    start_position: int
    hidden: np.ndarray  # the input sent, [B, T, D] float32


@dataclass(frozen=True)
class SentStep:
    """A step sent and not yet answered (`HopSession.send_step`)."""

    hidden: np.ndarray
    start_position: int
    chunks: tuple[int, ...]
    started: float  # trio clock
    wire_before: int  # the stream's bytes before it
    decoded_from: WireTensor | None = None  # what `hidden` was decoded from (the previous hop's answer)


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
    times: HopTimes = field(default_factory=HopTimes)  # where the timed round trips went besides compute
    replays_chunks: bool = False  # the node runs a multi-step replay chunk by chunk (Step.chunks)
    links: LinkBook | None = None  # where each step's bytes and time are recorded
    rewinds_steps: bool = False  # the node takes Step.rewind and computes short steps row-exactly
    chunk_invariant: bool = False  # the node's outputs do not depend on how positions are split into steps
    rewinding: bool = False  # the next step starts before the node's end: it says so (Step.rewind)
    answer: WireTensor | None = None  # the last step's output as it arrived: the next hop may be sent it as is
    path: PathKind = PathKind.DIRECT  # how the session's stream travels (a data channel is direct)
    relay: str | None = None  # the relay it runs through, when RELAYED

    @property
    def length(self) -> int:
        return sum(record.hidden.shape[1] for record in self.history)

    def rewind(self, position: int) -> None:
        """Forget the inputs from `position` on: the next step starts there and says `rewind`, and the
        node cuts its cache there too. `position` is a step boundary, or inside a step of at most
        `ROW_EXACT_TOKENS` tokens (whose rows are exact on their own, so its kept rows replay exactly)."""
        if position >= self.length:
            return
        if not self.can_rewind_to(position):
            last = next(r for r in self.history if r.start_position < position <= r.start_position + r.hidden.shape[1])
            raise ValueError(f"position {position} is inside a step of hop {self.peer_id} "
                             f"(from {last.start_position}, {last.hidden.shape[1]} tokens)")
        kept = [record for record in self.history if record.start_position < position]
        last = kept[-1] if kept else None
        if last is not None and last.start_position + last.hidden.shape[1] > position:
            kept[-1] = StepRecord(last.start_position, last.hidden[:, : position - last.start_position])
        self.history = kept
        self.rewinding = True

    def can_rewind_to(self, position: int) -> bool:
        """Whether `rewind(position)` keeps a history that replays exactly: anywhere on a node whose
        outputs do not depend on the steps' sizes."""
        if self.chunk_invariant:
            return True
        for record in self.history:
            end = record.start_position + record.hidden.shape[1]
            if record.start_position < position < end:
                return record.hidden.shape[1] <= ROW_EXACT_TOKENS
        return True

    async def step(self, hidden: np.ndarray, start_position: int, *, timeout: float, replay: bool = False,
                   chunks: tuple[int, ...] = (), decoded_from: WireTensor | None = None) -> np.ndarray:
        """Send `hidden` [B, T, D] at `start_position` (as `chunks` of the original steps, when
        replaying several at once); the hop's output. `decoded_from`: the tensor `hidden` was
        decoded from (the previous hop's `answer`), sent as it is where that gives the same values
        (`encode_tensor`). Raises HopFailed."""
        sent = self._sent(hidden, start_position, chunks, decoded_from)
        try:
            reply = await self.stream.request(self._message(sent, replay), timeout=timeout)
        except (TransportError, ProtocolError) as err:
            raise self._failed(err) from err
        return self._answer(sent, reply, timed=True)

    async def send_step(self, hidden: np.ndarray, start_position: int, *, timeout: float,
                        chunks: tuple[int, ...] = ()) -> SentStep:
        """`step` in two halves (a spot check's checker computes while the client goes on): send it
        now, `receive_step` its output later, before this session's next step. Raises HopFailed."""
        sent = self._sent(hidden, start_position, chunks)
        try:
            await self.stream.send(self._message(sent, replay=False), timeout=timeout)
        except (TransportError, ProtocolError) as err:
            raise self._failed(err) from err
        return sent

    async def receive_step(self, sent: SentStep, *, timeout: float) -> np.ndarray:
        try:
            reply = await self.stream.receive(timeout=timeout)
        except (TransportError, ProtocolError) as err:
            raise self._failed(err) from err
        return self._answer(sent, reply, timed=False)  # its time is the client's, not the link's

    def _failed(self, err: Exception) -> HopFailed:
        return HopFailed(self.peer_id, self.start, self.end, str(err),
                         relay_lost=self.path is PathKind.RELAYED and isinstance(err, StreamClosed))

    def _sent(self, hidden: np.ndarray, start_position: int, chunks: tuple[int, ...],
              decoded_from: WireTensor | None = None) -> SentStep:
        return SentStep(hidden, start_position, chunks, trio.current_time(),
                        self.stream.bytes_sent + self.stream.bytes_received, decoded_from)

    def _message(self, sent: SentStep, replay: bool) -> Step:
        return Step(session_id=self.session_id, step=self.step_number, start_position=sent.start_position,
                    hidden=encode_tensor(sent.hidden, self.codec, decoded_from=sent.decoded_from),
                    replay=replay, chunks=sent.chunks,
                    rewind=self.rewinding)

    def _answer(self, sent: SentStep, reply: Message, *, timed: bool) -> np.ndarray:
        """The output a `reply` to `sent` carries, checked; the input joins the history."""
        answered = trio.current_time()  # the link's time: our encoding before `started`, decoding after this
        self.step_number += 1
        self.rewinding = False  # answered or failed: a replacement starts from its replayed history
        if isinstance(reply, Error):
            raise HopFailed(self.peer_id, self.start, self.end, f"node says: {reply.reason}", retry=classify(reply))
        if not isinstance(reply, StepResult):
            raise HopFailed(self.peer_id, self.start, self.end, f"expected step_result, got {reply.TYPE}")
        try:
            output = decode_tensor(reply.hidden).astype(np.float32, copy=False)
        except ProtocolError as err:
            raise HopFailed(self.peer_id, self.start, self.end, f"bad step result: {err}") from err
        hidden, start_position, chunks = sent.hidden, sent.start_position, sent.chunks
        if output.shape != hidden.shape:
            raise HopFailed(self.peer_id, self.start, self.end,
                            f"step result has shape {list(output.shape)}, sent {list(hidden.shape)}")
        self.answer = reply.hidden
        # replayed inputs too, in their original chunks: a later failover replays them again
        if len(chunks) <= 1:
            self.history.append(StepRecord(start_position, hidden))
        else:
            offsets = np.cumsum((0, *chunks))
            self.history.extend(StepRecord(start_position + int(a), hidden[:, a:b]) for a, b in zip(offsets, offsets[1:]))
        self.compute_seconds += reply.compute_seconds
        if timed:
            now, times = trio.current_time(), self.times
            self.wall_seconds += now - sent.started
            times.send += self.stream.last_write_at - sent.started
            times.node_before += reply.before_compute_seconds
            times.node_after += reply.after_compute_seconds
            times.receive += now - self.stream.last_read_at
            if self.links is not None:
                wire = self.stream.bytes_sent + self.stream.bytes_received - sent.wire_before
                self.links.record(self.peer_id, Exchange(wire, answered - sent.started - reply.compute_seconds))
        return output

    async def close(self) -> None:
        with trio.move_on_after(1.0):
            try:
                await self.stream.send(CloseSession(session_id=self.session_id), timeout=1.0)
            except (TransportError, ProtocolError):
                pass
        await self.stream.aclose()


async def open_hop(transport: Transport, peer_id: str, start: int, end: int, *, model_id: str,
                   manifest_hash: str, max_length: int, batch: int, codec: Codec | str, timeout: float,
                   io_timeout: float, data_channel: bool = True, hidden_size: int = 0,
                   links: LinkBook | None = None, swarm: SwarmSecret | None = None) -> HopSession:
    """Open a session for blocks [start, end) on `peer_id`; its steps go over the node's data
    channel when both Hellos list it and the node offers one this client can reach. `codec` is a
    `Codec` or `protocol.AUTO` (chosen for messages of `batch` x `hidden_size` values on the link
    `links` has measured to this peer; steps are recorded there). With a `swarm` secret, our Hello
    carries our proof and a node whose Hello carries no valid proof is sent nothing more (household
    mode, `mesh.swarm_secret`). Raises HopFailed."""
    session_id = secrets.token_hex(8)
    hello = Hello(software=CLIENT_SOFTWARE, codecs=tuple(Codec), codec_speeds=REFERENCE_SPEEDS,
                  capabilities=tuple(c for c in CAPABILITIES if data_channel or c != DATA_CHANNEL),
                  swarm_proof=proof_of(swarm, transport.peer_id))
    link = links.estimate(peer_id) if links is not None and hidden_size > 0 else None
    stream = None
    try:
        with trio.fail_after(timeout):
            raw = await transport.open_stream(peer_id, INFERENCE_PROTOCOL, timeout=timeout)
            stream = MessageStream(raw, Role.CLIENT, io_timeout=io_timeout)
            reply = await stream.request(hello, timeout=timeout)  # the machine lets only Hello or Error through
            if isinstance(reply, Hello) and (unproven := refusal_reason(swarm, stream.peer_id, reply.swarm_proof)):
                await stream.aclose()
                raise HopFailed(peer_id, start, end, f"not trusted: {unproven}")
            if isinstance(reply, Hello):
                codec = session_codec(stream.agreement, codec, n_values=batch * hidden_size, link=link)
                reply = await stream.request(OpenSession(
                    session_id=session_id, model_id=model_id, manifest_hash=manifest_hash, start=start, end=end,
                    max_length=max_length, batch_size=batch, codec=codec), timeout=timeout)
    except (trio.TooSlowError, TransportError, ProtocolError) as err:
        if stream is not None:
            await stream.aclose()
        reason = f"no session within {timeout:g} s" if isinstance(err, trio.TooSlowError) else str(err)
        raise HopFailed(peer_id, start, end, reason) from err
    if isinstance(reply, Error):
        await stream.aclose()
        raise HopFailed(peer_id, start, end, f"node refused: {reply.reason}", retry=classify(reply))
    if not isinstance(reply, SessionOpened):
        await stream.aclose()
        raise HopFailed(peer_id, start, end, f"expected session_opened, got {reply.TYPE}")
    agreement = stream.agreement
    path = transport.path(peer_id) or PathKind.DIRECT
    if reply.data_address and agreement.supports(DATA_CHANNEL) and path is PathKind.DIRECT:
        # only to a node we reached directly: through a relay or NATs its listener is not ours to reach
        stream = await _to_data_channel(stream, reply, timeout=min(timeout, DATA_CHANNEL_TIMEOUT_S))
    return HopSession(peer_id, start, end, stream, session_id, codec, replays_chunks=agreement.supports(REPLAY_CHUNKS),
                      links=links, rewinds_steps=agreement.supports(REWIND_STEPS),
                      chunk_invariant=agreement.supports(CHUNK_INVARIANT), path=path,
                      relay=transport.relay_of(peer_id) if path is PathKind.RELAYED else None)


async def _to_data_channel(stream: MessageStream, opened: SessionOpened, *, timeout: float) -> MessageStream:
    """The session continued on the data channel the node offered, or on `stream` if it cannot be reached."""
    offer = Offer(opened.data_address, opened.data_token, opened.data_key)
    try:
        check_offered_host(offer.address, stream.raw.remote_host)
        sealed = await connect_data_channel(offer, stream.peer_id, timeout=timeout)
    except (TransportError, ValueError) as err:
        log.info("data channel to %s unreachable (%s); staying on libp2p", stream.peer_id, err)
        return stream
    await stream.aclose()
    return stream.moved_to(sealed)
