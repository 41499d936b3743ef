"""The node's side of the wire: the conversation on each incoming stream.

Inference streams (`protocol.INFERENCE_PROTOCOL`) carry one session each: Hello both ways,
OpenSession -> SessionOpened, then Step -> StepResult until CloseSession. Info streams
(`protocol.INFO_PROTOCOL`) answer Hello with this node's Hello and current SpanInfo, and Ping with
Pong (clients measure round trips with them). The order is the session machine's
(`protocol.session`); what the two Hellos agree on (`protocol.negotiate`) decides the data channel
offer. Whatever a peer gets wrong earns it an `Error` reply naming the problem, with the retry hint
`protocol.retry` gives its code; the node logs it and keeps serving everyone else. A peer off the
allow-list is refused on both protocols before a byte it sent is read; frames stay small until a
session is open, and unfinished ones are paid for from a memory budget (`node.intake`). In
household mode (a swarm secret, `mesh.swarm_secret`) a peer whose Hello carries no valid proof of
the secret is refused on both protocols before the node says anything of its own, and the node's
Hellos carry its own proof.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Collection

import trio

from mesh.data_channel import DataChannels, Offer
from mesh.errors import TransportError, TransportTimeout
from mesh.swarm_secret import SwarmSecret, proof_of, refusal_reason
from mesh.transport import ByteStream, MessageStream
from node.intake import BudgetedStream, BufferBudget, IntakeLimits
from node.metrics import NodeMetrics
from node.sessions import ServedSession, SessionManager, SessionRefused
from protocol import (
    CHUNK_INVARIANT, DATA_CHANNEL, REFERENCE_SPEEDS, REPLAY_CHUNKS, REWIND_STEPS, Codec, CloseSession, Error, ErrorCode, Hello, Message,
    OpenSession, Ping, Pong, ProtocolError, Role, SessionOpened, SpanInfo, Step, StepResult, decode_tensor,
    encode_tensor,
)
from protocol.retry import retry_elsewhere as _retry_elsewhere

log = logging.getLogger("hearth.node")

SOFTWARE = "hearth/0.1"
SUPPORTED_CODECS = tuple(Codec)
HELLO = Hello(software=SOFTWARE, codecs=SUPPORTED_CODECS, capabilities=(REPLAY_CHUNKS,))  # info streams: built once


def refusal(code: ErrorCode, reason: str) -> SessionRefused:
    """A refusal whose retry hint is the one `protocol.retry` gives its code."""
    return SessionRefused(code, reason, retry_elsewhere=_retry_elsewhere(code))


class InferenceServer:
    def __init__(self, manager: SessionManager, span_info: Callable[[], SpanInfo], *,
                 allowed_peers: Collection[str] | None = None, io_timeout: float = 30.0,
                 data_channels: DataChannels | None = None, metrics: NodeMetrics | None = None,
                 intake: IntakeLimits | None = None, swarm_secret: SwarmSecret | None = None):
        self.manager = manager
        self.metrics = metrics if metrics is not None else NodeMetrics()
        self.data_channels = data_channels
        self.span_info = span_info
        self.allowed_peers = None if allowed_peers is None else frozenset(allowed_peers)
        self.swarm_secret = swarm_secret  # household mode: only peers proving it are served
        self._info_hello = HELLO
        self.io_timeout = io_timeout
        self.intake = intake or IntakeLimits()
        self.buffers = BufferBudget(self.intake.max_buffered_bytes_per_peer, self.intake.max_buffered_bytes)
        self._live: dict[str, trio.CancelScope] = {}
        self._stepping: dict[str, bool] = {}  # session id -> whether to stop once the step in flight is answered
        capabilities = ((REPLAY_CHUNKS, REWIND_STEPS) + ((DATA_CHANNEL,) if data_channels is not None else ())
                        + ((CHUNK_INVARIANT,) if manager.span.chunk_invariant else ()))
        # on inference streams, with the codec speeds a client weighs its codec choice by
        self._session_hello = Hello(software=SOFTWARE, codecs=SUPPORTED_CODECS, capabilities=capabilities,
                                    codec_speeds=REFERENCE_SPEEDS)
        manager.on_end = self._ended

    def hello(self) -> Hello:
        return self._info_hello

    def identify(self, peer_id: str) -> None:
        """This node's own peer id (known once its transport is up): its Hellos prove the swarm's
        secret with it, in household mode."""
        proof = proof_of(self.swarm_secret, peer_id)
        self._info_hello = dataclasses.replace(HELLO, swarm_proof=proof)
        self._session_hello = dataclasses.replace(self._session_hello, swarm_proof=proof)

    def _check_proof(self, peer_id: str, hello: Hello) -> None:
        """Refuse a peer whose Hello does not prove the swarm's secret (household mode)."""
        reason = refusal_reason(self.swarm_secret, peer_id, hello.swarm_proof)
        if reason is not None:  # who the peer is, as with the allow-list: no other node will differ
            raise SessionRefused(ErrorCode.OVERLOADED, reason, retry_elsewhere=False)

    def admit(self, peer_id: str, hello: Hello | None) -> None:
        """Refuse (`SessionRefused`) a peer off the allow-list, or whose Hello lacks the household's proof."""
        self._check_allowed(peer_id)
        if hello is not None:
            self._check_proof(peer_id, hello)

    def stream(self, raw: ByteStream) -> BudgetedStream:
        """A peer's stream as every protocol of this node reads it (`_stream`)."""
        return self._stream(raw)

    def _stream(self, raw: ByteStream) -> BudgetedStream:
        """Messages from a peer: small frames until its session is open, unfinished ones budgeted."""
        return BudgetedStream(raw, Role.HOP, budget=self.buffers, limits=self.intake, io_timeout=self.io_timeout)

    def _check_allowed(self, peer_id: str) -> None:
        """Refuse a peer not on the allow-list, on every protocol, before a byte it sent is read."""
        if self.allowed_peers is not None and peer_id not in self.allowed_peers:
            # who the peer is, not how busy we are: its client should not wait for another node
            raise SessionRefused(ErrorCode.OVERLOADED, f"peer {peer_id} is not on this node's allow-list",
                                 retry_elsewhere=False)

    async def handle_info(self, raw: ByteStream) -> None:
        stream = self._stream(raw)
        try:
            self._check_allowed(raw.peer_id)
            while True:
                message = await stream.receive(timeout=self.io_timeout)
                if isinstance(message, Ping):
                    await stream.send(Pong(nonce=message.nonce))
                elif isinstance(message, Hello):
                    self._check_proof(raw.peer_id, message)
                    await stream.send_together([self.hello(), self.span_info()])
                else:
                    await self._refuse(stream, ErrorCode.UNEXPECTED_MESSAGE,
                                       f"{type(message).__name__} is not allowed on an info stream")
                    return
        except SessionRefused as err:
            log.debug("info stream from %s refused: %s", raw.peer_id, err.reason)
            await self._refuse(stream, err.code, err.reason, retry_elsewhere=err.retry_elsewhere)
        except ProtocolError as err:  # a frame over the limit, bad bytes: the peer is told which
            log.debug("info stream from %s sent bad data: %s", raw.peer_id, err)
            await self._refuse(stream, err.code, str(err))
        except TransportError as err:
            log.debug("info stream from %s ended: %s", raw.peer_id, err)
        finally:
            await stream.aclose()

    async def handle_inference(self, raw: ByteStream) -> None:
        stream = control = self._stream(raw)
        session: ServedSession | None = None
        offer: Offer | None = None
        arrival: trio.MemoryReceiveChannel | None = None
        try:
            self._check_allowed(raw.peer_id)
            session, offer, arrival = await self._open(control)
            first = None
            if offer is not None:
                stream, first = await self._take_channel(control, session, arrival)
            await self._serve(stream, session, first)
        except ProtocolError as err:
            log.warning("peer %s sent bad data: %s", raw.peer_id, err)
            self.metrics.session_refused(err.code, opened=session is not None)
            await self._refuse(stream, err.code, str(err))
        except SessionRefused as err:
            log.info("peer %s refused: %s", raw.peer_id, err.reason)
            self.metrics.session_refused(err.code, opened=session is not None)
            await self._refuse(stream, err.code, err.reason, retry_elsewhere=err.retry_elsewhere,
                               session_id=session.session_id if session else "")
        except TransportError as err:
            log.info("stream from %s ended: %s", raw.peer_id, err)
        except Exception:  # a bug of ours must not take the node down, and the peer should know
            log.exception("internal error serving %s", raw.peer_id)
            await self._refuse(stream, ErrorCode.INTERNAL_ERROR, "internal error on the node; retry elsewhere")
        finally:
            if session is not None:
                self._live.pop(session.session_id, None)
                self.manager.close(session)
            if offer is not None:
                await self._withdraw(offer, arrival)
            await stream.aclose()
            if stream is not control:
                await control.aclose()

    async def _open(self, stream: BudgetedStream) -> tuple[ServedSession, Offer | None, trio.MemoryReceiveChannel | None]:
        message = await stream.receive(timeout=self.io_timeout)  # the machine admits Hello first, or a Ping
        if not isinstance(message, Hello):
            raise refusal(ErrorCode.UNEXPECTED_MESSAGE, f"expected hello, got {message.TYPE}")
        self._check_proof(stream.peer_id, message)
        await stream.send(self._session_hello)
        message = await stream.receive(timeout=self.io_timeout)
        if not isinstance(message, OpenSession):
            raise refusal(ErrorCode.UNEXPECTED_MESSAGE, f"expected open_session, got {message.TYPE}")
        info = self.span_info()
        if message.manifest_hash != info.manifest_hash:
            raise refusal(ErrorCode.MODEL_MISMATCH,
                          f"this node serves model {info.manifest_hash[:16]}..., not {message.manifest_hash[:16]}...")
        session = self.manager.open(message.session_id, stream.peer_id, message.start, message.end,
                                    message.max_length, message.batch_size)
        session.codec = message.codec
        stream.allow_session_frames()  # the peer is allowed and its session open: frames of any size now
        self.metrics.session_opened()
        offer, arrival = None, None
        if stream.agreement.supports(DATA_CHANNEL) and self.data_channels is not None:
            offer, arrival = self.data_channels.offer(stream.peer_id, reached_on=stream.raw.local_host)
            await stream.send(SessionOpened(session_id=message.session_id, data_address=offer.address,
                                            data_token=offer.token, data_key=offer.key))
        else:
            await stream.send(SessionOpened(session_id=message.session_id))
        log.info("session %s opened by %s for blocks [%d, %d)", message.session_id, stream.peer_id,
                 message.start, message.end)
        return session, offer, arrival

    async def _withdraw(self, offer: Offer, arrival: trio.MemoryReceiveChannel) -> None:
        """No channel may bind to this session any more; one that bound unused is closed."""
        self.data_channels.withdraw(offer)
        try:
            unused = arrival.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            unused = None
        arrival.close()
        if unused is not None:
            await unused.aclose()

    async def _take_channel(self, control: MessageStream, session: ServedSession,
                            arrival: trio.MemoryReceiveChannel) -> tuple[MessageStream, Message | None]:
        """The stream the client steps on: the data channel, if it binds before a message comes
        on the libp2p stream (a client that could not reach it steps there); and that message."""
        chosen: tuple[MessageStream, Message | None] | None = None
        idle = self.manager.limits.idle_timeout_s

        async def bound(cancel: trio.CancelScope) -> None:
            nonlocal chosen
            chosen = (control.moved_to(await arrival.receive()), None)
            cancel.cancel()

        async def first_message(cancel: trio.CancelScope) -> None:
            nonlocal chosen, failure
            try:
                chosen = (control, await control.receive(timeout=idle + 1))
            except TransportError:
                await trio.sleep_forever()  # the client closed the libp2p stream: it went to the channel
            except (ProtocolError, SessionRefused) as err:
                failure = err  # raised below, outside the nursery, to be answered like any bad message
            cancel.cancel()

        failure: ProtocolError | SessionRefused | None = None
        with trio.move_on_after(idle):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bound, nursery.cancel_scope)
                nursery.start_soon(first_message, nursery.cancel_scope)
        if failure is not None:
            raise failure
        if chosen is None:
            raise refusal(ErrorCode.SESSION_EXPIRED, f"session {session.session_id} was idle for {idle:g} s")
        return chosen

    async def _serve(self, stream: MessageStream, session: ServedSession, first: Message | None = None) -> None:
        """Answer the session's messages until it closes, idles out or is stopped. One cancel scope
        bounds every wait of the loop (a scope per message is a measurable share of a simulated
        swarm's time): its deadline is the idle limit while a message is awaited, the I/O timeout
        while an answer is written, and none while the step computes."""
        idle, io = self.manager.limits.idle_timeout_s, stream.io_timeout
        waiting_for = ""  # what the deadline bounds now: "message", "answer", or nothing
        with trio.CancelScope() as scope:
            self._live[session.session_id] = scope
            while True:
                if first is None:
                    waiting_for, scope.deadline = "message", trio.current_time() + idle
                    message = await stream.receive_unbounded()
                    arrived = stream.last_read_at
                else:
                    message, first, arrived = first, None, trio.current_time()
                waiting_for, scope.deadline = "", math.inf
                if isinstance(message, CloseSession):
                    log.info("session %s closed after %d steps", session.session_id, session.steps)
                    return
                if isinstance(message, Ping):
                    waiting_for, scope.deadline = "answer", trio.current_time() + io
                    await stream.send_unbounded(Pong(nonce=message.nonce))
                    continue
                self._stepping[session.session_id] = False
                try:
                    first_step = session.steps == 0
                    result = await self._step(session, message, arrived)
                    waiting_for, scope.deadline = "answer", trio.current_time() + io
                    await stream.send_unbounded(result)
                    self.metrics.step(message, result, first=first_step)  # once answered: off the client's wait
                finally:
                    if self._stepping.pop(session.session_id):
                        scope.cancel()  # asked to stop during the step: now that it is answered
        if session.ended is not None:
            raise session.ended
        if self.manager.draining:
            raise refusal(ErrorCode.SHUTTING_DOWN, "this node is shutting down; replay elsewhere")
        if waiting_for == "message":
            raise refusal(ErrorCode.SESSION_EXPIRED, f"session {session.session_id} was idle for {idle:g} s")
        if waiting_for == "answer":
            raise TransportTimeout(stream.peer_id, "sending an answer", io)

    def _stop(self, session_id: str) -> None:
        """End a session's loop: at once when it waits for a message, else once its step is answered."""
        if session_id in self._stepping:
            self._stepping[session_id] = True
        elif (scope := self._live.get(session_id)) is not None:
            scope.cancel()

    def _ended(self, session: ServedSession) -> None:
        self._stop(session.session_id)

    async def _step(self, session: ServedSession, message: Message, arrived: float) -> StepResult:
        """Compute a step that arrived at `arrived` (trio's clock); its answer says where the node's time went."""
        if not isinstance(message, Step):
            raise refusal(ErrorCode.UNEXPECTED_MESSAGE, f"expected step, got {message.TYPE}")
        self.manager.check_input(session, message.hidden.shape, message.start_position, rewind=message.rewind)
        hidden = decode_tensor(message.hidden)
        output, seconds = await self.manager.step(session, hidden, message.start_position, message.chunks,
                                                  rewind=message.rewind)
        computed = trio.current_time()
        encoded = encode_tensor(output, session.codec)
        return StepResult(session_id=session.session_id, step=message.step, hidden=encoded, compute_seconds=seconds,
                          before_compute_seconds=max(0.0, computed - seconds - arrived),
                          after_compute_seconds=trio.current_time() - computed)

    def drain(self) -> None:
        """Refuse new sessions and end open ones with an error telling their clients to go elsewhere."""
        self.manager.draining = True
        for session_id in list(self._live):
            self._stop(session_id)

    async def _refuse(self, stream: MessageStream, code: ErrorCode, reason: str, *,
                      retry_elsewhere: bool | None = None, session_id: str = "") -> None:
        """Tell the peer why; the retry hint is `protocol.retry`'s for `code` unless given."""
        hint = _retry_elsewhere(code) if retry_elsewhere is None else retry_elsewhere
        try:
            await stream.send(Error(code=code, reason=reason, retry_elsewhere=hint, session_id=session_id),
                              timeout=2.0)
        except (TransportError, ProtocolError):
            pass  # the peer is gone or the stream is unusable; nothing more to tell it
