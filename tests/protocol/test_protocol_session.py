"""Session state machine and Connection: two ends talk through a fake link, no sockets."""

from __future__ import annotations

import itertools

import msgpack
import numpy as np
import pytest

from protocol import (
    CloseSession,
    Codec,
    Connection,
    DialBackRequest,
    DialBackResult,
    Error,
    ErrorCode,
    FrameTooLarge,
    Hello,
    InvalidTensor,
    LocalProtocolError,
    Message,
    OpenSession,
    Ping,
    ManifestData,
    ManifestRequest,
    PieceData,
    PieceRequest,
    Pong,
    RemoteProtocolError,
    Role,
    SessionMachine,
    SessionOpened,
    SpanInfo,
    State,
    Step,
    StepResult,
    encode_tensor,
)
from protocol.session import LIVE_STATES, LIVENESS_MESSAGES, TRANSITIONS

HIDDEN = encode_tensor(np.ones((1, 1, 64), np.float32), Codec.FP16)
SID = "session-1"


def sample(kind: type[Message], step: int = 0) -> Message:
    """A message of each type, consistent with session SID and step `step`."""
    return {
        OpenSession: lambda: OpenSession(session_id=SID, model_id="m", manifest_hash="h",
                                         start=0, end=4, max_length=64),
        SessionOpened: lambda: SessionOpened(session_id=SID),
        Step: lambda: Step(session_id=SID, step=step, start_position=step, hidden=HIDDEN),
        StepResult: lambda: StepResult(session_id=SID, step=step, hidden=HIDDEN),
        CloseSession: lambda: CloseSession(session_id=SID),
        Error: lambda: Error(code=ErrorCode.OVERLOADED, reason="busy", session_id=SID),
        Hello: lambda: Hello(software="t"),
        SpanInfo: lambda: SpanInfo(model_id="m", manifest_hash="h", start=0, end=4),
        Ping: lambda: Ping(nonce=1),
        Pong: lambda: Pong(nonce=1),
        ManifestRequest: lambda: ManifestRequest(manifest_hash="h"),
        ManifestData: lambda: ManifestData(manifest_hash="h", manifest=b"{}"),
        PieceRequest: lambda: PieceRequest(manifest_hash="h", path="model.gguf", index=0),
        PieceData: lambda: PieceData(manifest_hash="h", path="model.gguf", index=0, data=b"x"),
        DialBackRequest: lambda: DialBackRequest(addrs=("/ip4/10.0.0.2/tcp/4001/p2p/x",)),
        DialBackResult: lambda: DialBackResult(reached=(True,), observed="/ip4/10.0.0.1"),
    }[kind]()


HANDSHAKE = [(Role.CLIENT, Hello), (Role.HOP, Hello)]
PATHS: dict[State, list[tuple[Role, type[Message]]]] = {
    State.NEW: [],
    State.GREETED: HANDSHAKE[:1],
    State.IDLE: HANDSHAKE,
    State.OPENING: HANDSHAKE + [(Role.CLIENT, OpenSession)],
    State.OPEN: HANDSHAKE + [(Role.CLIENT, OpenSession), (Role.HOP, SessionOpened)],
    State.STEPPING: HANDSHAKE + [(Role.CLIENT, OpenSession), (Role.HOP, SessionOpened), (Role.CLIENT, Step)],
    State.CLOSED: HANDSHAKE + [(Role.CLIENT, OpenSession), (Role.HOP, SessionOpened),
                               (Role.CLIENT, CloseSession)],
    State.ERRORED: HANDSHAKE + [(Role.CLIENT, OpenSession), (Role.HOP, Error)],
    State.FETCHING: HANDSHAKE + [(Role.CLIENT, PieceRequest)],
    State.CHECKING: HANDSHAKE + [(Role.CLIENT, DialBackRequest)],
}
KINDS = [OpenSession, SessionOpened, Step, StepResult, CloseSession, Error, Hello, SpanInfo,
         Ping, Pong, ManifestRequest, ManifestData, PieceRequest, PieceData, DialBackRequest, DialBackResult]


def machine_in(state: State, role: Role) -> SessionMachine:
    machine = SessionMachine(role)
    for sender, kind in PATHS[state]:
        (machine.send if sender is role else machine.receive)(sample(kind))
    assert machine.state is state
    return machine


def expected(state: State, sender: Role, kind: type[Message]) -> State | None:
    if kind is Error:
        return None if state is State.CLOSED else State.ERRORED
    if kind in LIVENESS_MESSAGES:
        return state if state in LIVE_STATES else None
    return TRANSITIONS.get((state, sender, kind))


@pytest.mark.parametrize(("state", "sender", "kind"),
                         list(itertools.product(State, Role, KINDS)))
def test_every_state_sender_and_message_follows_the_table(
    state: State, sender: Role, kind: type[Message]
) -> None:
    """Both ends agree: the sender's send and the receiver's receive succeed or fail together."""
    want = expected(state, sender, kind)
    sending, receiving = machine_in(state, sender), machine_in(state, sender.peer)
    message = sample(kind)
    if want is None:
        with pytest.raises(LocalProtocolError) as local:
            sending.send(message)
        with pytest.raises(RemoteProtocolError) as remote:
            receiving.receive(message)
        assert local.value.code is remote.value.code is ErrorCode.UNEXPECTED_MESSAGE
        assert sending.state is receiving.state is State.ERRORED
    else:
        sending.send(message)
        receiving.receive(message)
        assert sending.state is receiving.state is want


class Link:
    """Two Connections joined by byte queues, delivering in whatever chunks we choose."""

    def __init__(self) -> None:
        self.client = Connection(Role.CLIENT)
        self.hop = Connection(Role.HOP)

    def send(self, sender: Connection, message: Message, chunk: int = 7) -> list[Message]:
        data = sender.send(message)
        receiver = self.hop if sender is self.client else self.client
        events: list[Message] = []
        for start in range(0, len(data), chunk):
            receiver.receive_data(data[start : start + chunk])
            while (event := receiver.next_event()) is not None:
                events.append(event)
        return events


def test_a_whole_session_through_a_fake_link() -> None:
    link = Link()
    assert link.send(link.client, Hello(software="client")) == [Hello(software="client")]
    assert link.send(link.hop, Hello(software="hop"))[0].software == "hop"
    link.send(link.client, sample(OpenSession))
    assert link.client.state is link.hop.state is State.OPENING
    link.send(link.hop, sample(SessionOpened))
    for step in range(5):
        [received] = link.send(link.client, sample(Step, step))
        assert received.step == step and link.hop.state is State.STEPPING
        link.send(link.client, Ping(nonce=step))
        link.send(link.hop, Pong(nonce=step))
        link.send(link.hop, sample(StepResult, step))
        assert link.client.state is link.hop.state is State.OPEN
    link.send(link.client, sample(CloseSession))
    assert link.client.state is link.hop.state is State.CLOSED


def test_session_ids_and_step_numbers_must_match() -> None:
    machine = machine_in(State.OPEN, Role.HOP)
    with pytest.raises(RemoteProtocolError, match="session id 'other'"):
        machine.receive(Step(session_id="other", step=0, start_position=0, hidden=HIDDEN))
    machine = machine_in(State.OPEN, Role.HOP)
    machine.receive(sample(Step, 4))
    machine.send(sample(StepResult, 4))
    with pytest.raises(RemoteProtocolError, match="step 4 does not follow step 4"):
        machine.receive(sample(Step, 4))
    machine = machine_in(State.STEPPING, Role.CLIENT)
    with pytest.raises(RemoteProtocolError, match="result for step 7 while step 0"):
        machine.receive(sample(StepResult, 7))


def test_after_an_error_only_errors_pass() -> None:
    link = Link()
    link.send(link.client, Hello(software="client"))
    link.send(link.hop, Hello(software="hop"))
    link.send(link.client, sample(OpenSession))
    link.send(link.hop, Error(code=ErrorCode.CACHE_FULL, reason="full", retry_elsewhere=True))
    assert link.client.state is link.hop.state is State.ERRORED
    link.send(link.client, Error(code=ErrorCode.INTERNAL_ERROR, reason="ack"))
    with pytest.raises(LocalProtocolError):
        link.client.send(Ping(nonce=1))


def test_bad_bytes_become_remote_errors_with_the_cause_and_code() -> None:
    hop = Connection(Role.HOP, max_frame_bytes=100)
    with pytest.raises(RemoteProtocolError) as caught:
        hop.receive_data(b"\x00\x01\x00\x00")
        hop.next_event()
    assert isinstance(caught.value.__cause__, FrameTooLarge)
    assert caught.value.code is ErrorCode.FRAME_TOO_LARGE and hop.state is State.ERRORED
    assert hop.send(Error(code=caught.value.code, reason=str(caught.value)))[:4] != b""


def test_invalid_tensors_from_the_peer_are_remote_errors() -> None:
    hop = Connection(Role.HOP)
    wire = sample(Step).to_wire()
    wire["hidden"]["data"] = b"\0"
    body = msgpack.packb(wire, use_bin_type=True)
    hop.receive_data(len(body).to_bytes(4, "big") + body)
    with pytest.raises(RemoteProtocolError) as caught:
        hop.next_event()
    assert isinstance(caught.value.__cause__, InvalidTensor)
    assert caught.value.code is ErrorCode.INVALID_TENSOR


def test_frames_too_large_for_the_peer_are_local_errors() -> None:
    client = Connection(Role.CLIENT, peer_max_frame_bytes=100)
    with pytest.raises(LocalProtocolError) as caught:
        client.send(Hello(software="x" * 200))
    assert isinstance(caught.value.__cause__, FrameTooLarge)
    assert caught.value.code is ErrorCode.FRAME_TOO_LARGE


def test_hello_both_ways_comes_before_anything_but_liveness() -> None:
    """The handshake is the table's: the client's Hello, then the hop's, then the session."""
    for state, sender, kind in [(State.NEW, Role.CLIENT, OpenSession), (State.NEW, Role.HOP, Hello),
                                (State.GREETED, Role.CLIENT, OpenSession), (State.GREETED, Role.HOP, SpanInfo),
                                (State.IDLE, Role.CLIENT, Hello), (State.IDLE, Role.HOP, Hello)]:
        with pytest.raises(LocalProtocolError, match=f"state is {state.value}"):
            machine_in(state, sender).send(sample(kind))
    machine = machine_in(State.NEW, Role.HOP)
    machine.receive(Ping(nonce=1))  # a liveness check needs no handshake
    machine.send(Pong(nonce=1))
    assert machine.state is State.NEW and machine.agreement is None
    machine.receive(sample(Hello))
    assert machine.agreement is None  # only the client's Hello so far
    machine.send(Hello(software="hop"))
    assert machine.state is State.IDLE and machine.agreement is not None


def test_both_ends_reach_the_same_agreement_from_the_two_hellos() -> None:
    link = Link()
    link.send(link.client, Hello(software="client", codecs=(Codec.INT8_BLOCK64, Codec.FP16, Codec.FP32),
                                 capabilities=("data-channel", "replay-chunks", "from-the-future")))
    link.send(link.hop, Hello(software="hop", codecs=(Codec.FP32, Codec.FP16),
                              capabilities=("replay-chunks",)))
    agreement = link.client.agreement
    assert agreement == link.hop.agreement
    assert agreement.codecs == (Codec.FP16, Codec.FP32)  # the client's order
    assert agreement.capabilities == {"replay-chunks"}
