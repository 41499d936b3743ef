"""Messages: validation on construction, wire maps, versions, unknown types and fields."""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from wire_strategies import PROTOCOL_PROFILE, messages

from protocol import (
    Codec,
    CodecSpeed,
    DialBackRequest,
    DialBackResult,
    Error,
    ErrorCode,
    Hello,
    InvalidMessage,
    Message,
    OpenSession,
    PeerReportedError,
    ProtocolError,
    Ping,
    SpanInfo,
    Step,
    StepResult,
    UnknownMessageType,
    UnsupportedVersion,
    encode_tensor,
)
from protocol.messages import MESSAGE_TYPES, message_from_wire

HIDDEN = encode_tensor(np.ones((1, 1, 64), np.float32), Codec.FP16)


def wire_of(message: Message) -> dict[str, object]:
    """The map as a peer would receive it (through msgpack, so tuples are lists)."""
    return msgpack.unpackb(msgpack.packb(message.to_wire(), use_bin_type=True), raw=False)


@settings(PROTOCOL_PROFILE, max_examples=300)
@given(messages)
def test_every_message_survives_its_wire_map(message: Message) -> None:
    decoded = message_from_wire(wire_of(message))
    assert decoded == message and type(decoded) is type(message)


def test_every_type_is_covered_and_carries_the_version() -> None:
    assert set(MESSAGE_TYPES) == {
        "hello", "span_info", "open_session", "session_opened", "step", "step_result",
        "close_session", "error", "ping", "pong", "manifest_request", "manifest_data", "piece_request",
        "piece_data", "dial_back_request", "dial_back_result",
    }
    assert wire_of(Ping(nonce=1)) == {"type": "ping", "version": 1, "nonce": 1}


def test_unknown_fields_are_ignored() -> None:
    wire = wire_of(Ping(nonce=5)) | {"future_field": [1, {"x": b"y"}], "flags": 3}
    assert message_from_wire(wire) == Ping(nonce=5)
    tensor_wire = wire_of(Step(session_id="s", step=0, start_position=0, hidden=HIDDEN))
    tensor_wire["hidden"]["layout"] = "future"
    assert message_from_wire(tensor_wire).hidden == HIDDEN


@pytest.mark.parametrize("version", [0, 2, 1 << 40, "1", None, 1.0, True, [1]])
def test_unsupported_versions_are_refused(version: object) -> None:
    with pytest.raises(UnsupportedVersion) as caught:
        message_from_wire({"type": "ping", "version": version, "nonce": 1})
    assert caught.value.code is ErrorCode.UNSUPPORTED_VERSION
    with pytest.raises(UnsupportedVersion):
        message_from_wire({"type": "ping", "nonce": 1})


@pytest.mark.parametrize("message_type", ["pingg", "", None, 7, ["ping"], {"a": 1}, "x" * 5000])
def test_unknown_types_are_refused(message_type: object) -> None:
    with pytest.raises(UnknownMessageType) as caught:
        message_from_wire({"type": message_type, "version": 1})
    assert caught.value.code is ErrorCode.UNKNOWN_MESSAGE_TYPE
    assert len(str(caught.value)) < 200  # peer-supplied values are cut short


def test_missing_required_fields_are_named() -> None:
    with pytest.raises(InvalidMessage, match="Step lacks required field 'hidden'"):
        message_from_wire({"type": "step", "version": 1, "session_id": "s", "step": 0,
                           "start_position": 0})


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("step", -1, r"Step.step must be an int in \[0, "),
        ("step", 2**64, "Step.step must be an int"),
        ("step", True, "Step.step must be an int"),
        ("step", 1.5, "Step.step must be an int"),
        ("session_id", "", "Step.session_id must be a string of 1..256"),
        ("session_id", "x" * 257, "Step.session_id"),
        ("session_id", b"bytes", "Step.session_id"),
        ("replay", 1, "Step.replay must be a bool"),
        ("start_position", 2**32, "Step.start_position"),
        ("hidden", [1, 2], "a tensor must be a map"),
    ],
)
def test_wrong_field_values_are_named(field: str, value: object, match: str) -> None:
    wire = wire_of(Step(session_id="s", step=0, start_position=0, hidden=HIDDEN))
    wire[field] = value
    with pytest.raises(ProtocolError, match=match) as caught:
        message_from_wire(wire)
    assert caught.value.code in (ErrorCode.INVALID_MESSAGE, ErrorCode.INVALID_TENSOR)


def test_local_construction_is_validated_too() -> None:
    with pytest.raises(InvalidMessage, match=r"span \[5, 5\) is empty"):
        SpanInfo(model_id="m", manifest_hash="h", start=5, end=5)
    with pytest.raises(InvalidMessage, match="finite number >= 0, got nan"):
        StepResult(session_id="s", step=0, hidden=HIDDEN, compute_seconds=float("nan"))
    with pytest.raises(InvalidMessage, match="before_compute_seconds must be a finite number >= 0, got -1"):
        StepResult(session_id="s", step=0, hidden=HIDDEN, before_compute_seconds=-1.0)
    with pytest.raises(InvalidMessage, match="batch_size"):
        OpenSession(session_id="s", model_id="m", manifest_hash="h", start=0, end=1,
                    max_length=8, batch_size=0)
    with pytest.raises(InvalidMessage, match=r"shape \[batch, tokens, hidden\]"):
        Step(session_id="s", step=0, start_position=0,
             hidden=encode_tensor(np.ones((2, 64), np.float32), Codec.FP16))
    with pytest.raises(UnsupportedVersion):
        Ping(nonce=1, version=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Ping(nonce=1).nonce = 2  # type: ignore[misc]


def test_hello_drops_codec_ids_it_does_not_know() -> None:
    hello = Hello(software="hearth", codecs=(Codec.FP16,),
                  codec_speeds=(CodecSpeed(Codec.FP16, 1.0, 2.0, 3.0, 4.0),))
    wire = wire_of(hello)
    wire["codecs"] = [2, 99, 4]
    wire["codec_speeds"].append([99, 1, 1, 1, 1])
    decoded = message_from_wire(wire)
    assert decoded.codecs == (Codec.FP16, Codec.INT8_BLOCK64)
    assert decoded.codec_speeds == hello.codec_speeds
    wire["codec_speeds"] = [[2, -1.0, 0, 0, 0]]
    with pytest.raises(InvalidMessage, match="encode_fixed_ns must be a finite float >= 0"):
        message_from_wire(wire)
    wire["codecs"] = list(range(65))
    with pytest.raises(InvalidMessage, match="at most 64"):
        message_from_wire(wire)


def test_hello_carries_an_optional_swarm_proof() -> None:
    proof = bytes(range(32))
    assert message_from_wire(wire_of(Hello(software="h", swarm_proof=proof))).swarm_proof == proof
    assert message_from_wire({"type": "hello", "version": 1, "software": "old"}).swarm_proof == b""  # older peers
    for bad in (b"short", "x" * 32, bytes(33)):
        with pytest.raises(InvalidMessage, match="swarm_proof must be empty or 32 bytes"):
            message_from_wire(wire_of(Hello(software="h")) | {"swarm_proof": bad})


def test_span_info_names_its_kernels_and_older_nodes_name_none() -> None:
    info = SpanInfo(model_id="m", manifest_hash="h", start=0, end=4, kernels="torch 2.13.0+cpu; avx2")
    assert message_from_wire(wire_of(info)).kernels == "torch 2.13.0+cpu; avx2"
    old = wire_of(info)
    del old["kernels"]
    assert message_from_wire(old).kernels == ""
    with pytest.raises(InvalidMessage, match="kernels"):
        message_from_wire(wire_of(info) | {"kernels": "x" * 65})


def test_floats_accept_ints_from_other_implementations() -> None:
    wire = wire_of(SpanInfo(model_id="m", manifest_hash="h", start=0, end=4))
    wire["throughput"] = 12
    decoded = message_from_wire(wire)
    assert decoded.throughput == 12.0 and isinstance(decoded.throughput, float)


def test_errors_keep_unknown_codes_and_become_exceptions() -> None:
    known = message_from_wire(wire_of(Error(code=ErrorCode.CACHE_FULL, reason="full",
                                            retry_elsewhere=True)))
    assert known.code is ErrorCode.CACHE_FULL
    raised = known.to_exception()
    assert isinstance(raised, PeerReportedError) and raised.retry_elsewhere
    assert raised.code is ErrorCode.CACHE_FULL and "CACHE_FULL: full" in str(raised)
    future = message_from_wire(wire_of(Error(code=4242, reason="new")))
    assert future.code == 4242 and not isinstance(future.code, ErrorCode)
    assert "4242" in str(future.to_exception())


def test_step_chunks_round_trip_and_must_add_up_to_the_tokens():
    import numpy as np

    from protocol import Codec, FrameDecoder, InvalidMessage, Step, encode, encode_tensor

    hidden = encode_tensor(np.zeros((1, 5, 4), np.float32), Codec.FP32)
    message = Step(session_id="s", step=3, start_position=0, hidden=hidden, replay=True, chunks=(3, 1, 1))
    assert FrameDecoder().feed(encode(message))[0] == message
    for bad in [(3, 1), (0, 5), (5, -1), ("5",)]:
        try:
            Step(session_id="s", step=3, start_position=0, hidden=hidden, chunks=bad)
        except InvalidMessage:
            continue
        raise AssertionError(f"chunks {bad} accepted")


@pytest.mark.parametrize("fields", [
    {"data_address": "127.0.0.1:1"},  # no token or key
    {"data_address": "127.0.0.1:1", "data_token": bytes(16), "data_key": bytes(31)},
    {"data_token": bytes(16), "data_key": bytes(32)},  # no address
    {"data_address": "127.0.0.1:1", "data_token": "not bytes", "data_key": bytes(32)},
    {"data_address": "x" * 300, "data_token": bytes(16), "data_key": bytes(32)},
])
def test_a_data_channel_offer_is_all_or_nothing(fields):
    from protocol import SessionOpened

    with pytest.raises(InvalidMessage):
        SessionOpened(session_id="s", **fields)


def test_dial_back_messages_bound_what_a_peer_is_asked_to_dial() -> None:
    """A DialBackRequest names 1..4 addresses of bounded length; a result holds at most 4 bools."""
    request = DialBackRequest(addrs=("/ip4/10.0.0.2/tcp/4001/p2p/x",))
    assert message_from_wire(wire_of(request)) == request
    for addrs in ([], ["/ip4/10.0.0.2/tcp/1/p2p/x"] * 5, [7], ["x" * 300]):
        with pytest.raises(InvalidMessage, match="DialBackRequest.addrs"):
            message_from_wire(wire_of(request) | {"addrs": addrs})
    result = DialBackResult(reached=(True, False), observed="/ip4/192.0.2.7")
    assert message_from_wire(wire_of(result)) == result
    for reached in ([True] * 5, [1], "yes"):
        with pytest.raises(InvalidMessage, match="DialBackResult.reached"):
            message_from_wire(wire_of(result) | {"reached": reached})
