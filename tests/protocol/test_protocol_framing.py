"""Framing: any split of the stream decodes the same; limits hold before allocation."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_strategies import PROTOCOL_PROFILE, messages

from protocol import (
    Codec,
    FrameDecoder,
    FrameTooLarge,
    InvalidMessage,
    MalformedFrame,
    Message,
    Ping,
    Step,
    StructureLimits,
    UnknownMessageType,
    encode,
    encode_tensor,
)
from protocol.framing import decode_body
from protocol.fuzzing import frame_of


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])]


@settings(PROTOCOL_PROFILE, max_examples=200)
@given(st.lists(messages, min_size=1, max_size=4), st.lists(st.integers(0, 10**9), max_size=30))
def test_messages_survive_any_split_of_the_stream(sent: list[Message], cuts: list[int]) -> None:
    stream = b"".join(encode(message) for message in sent)
    decoder = FrameDecoder()
    received = []
    for chunk in split(stream, cuts):
        received += decoder.feed(chunk)
    assert received == sent
    assert decoder.buffered_bytes == 0


def test_one_byte_at_a_time() -> None:
    message = Step(session_id="s", step=3, start_position=9,
                   hidden=encode_tensor(np.ones((1, 2, 64), np.float32), Codec.INT8_BLOCK64))
    frame = encode(message)
    assert frame[:4] == (len(frame) - 4).to_bytes(4, "big")
    decoder = FrameDecoder()
    received = [m for i in range(len(frame)) for m in decoder.feed(frame[i : i + 1])]
    assert received == [message]


def test_oversized_length_is_refused_from_the_header_alone() -> None:
    decoder = FrameDecoder(max_frame_bytes=1000)
    assert decoder.feed(b"\x00\x00") == []
    with pytest.raises(FrameTooLarge) as caught:
        decoder.feed(b"\x03\xe9")  # 1001: only the 4 length bytes have arrived
    assert (caught.value.size, caught.value.limit) == (1001, 1000)
    assert "1001 bytes exceeds the limit of 1000" in str(caught.value)
    with pytest.raises(FrameTooLarge):  # the stream cannot be resynchronised
        decoder.feed(encode(Ping(nonce=1)))
    with pytest.raises(FrameTooLarge):
        FrameDecoder().feed(b"\xff\xff\xff\xff")


def test_a_frame_at_the_limit_is_accepted() -> None:
    frame = encode(Ping(nonce=1))
    assert FrameDecoder(max_frame_bytes=len(frame) - 4).feed(frame) == [Ping(nonce=1)]


def test_encode_refuses_frames_over_the_limit() -> None:
    big = Step(session_id="s", step=0, start_position=0,
               hidden=encode_tensor(np.ones((1, 1, 1000), np.float32), Codec.FP32))
    with pytest.raises(FrameTooLarge) as caught:
        encode(big, max_frame_bytes=3000)
    assert caught.value.limit == 3000 and caught.value.size > 4000


def test_bad_frames_consume_only_themselves() -> None:
    decoder = FrameDecoder()
    unknown = frame_of(msgpack.packb({"type": "teleport", "version": 1}))
    garbage = frame_of(b"\xc1\xc1")
    decoder.receive_data(encode(Ping(nonce=1)) + unknown + garbage + encode(Ping(nonce=2)))
    assert decoder.next_message() == Ping(nonce=1)
    with pytest.raises(UnknownMessageType):
        decoder.next_message()
    with pytest.raises(MalformedFrame):
        decoder.next_message()
    assert decoder.next_message() == Ping(nonce=2)
    assert decoder.next_message() is None


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "not valid msgpack"),
        (msgpack.packb([1, 2]), "must be a map"),
        (msgpack.packb({"type": "ping", "version": 1, "nonce": 1}) + b"\x00", "ExtraData"),
        (msgpack.packb({1: 2}), "not valid msgpack"),  # keys must be strings
        (b"\x91" * 2000 + b"\xc0", "not valid msgpack"),  # nesting past msgpack's stack
        (b"\x91" * 200 + b"\xc0", "more than 128 arrays and maps"),
        (b"\xdc\x01\x00" + b"\x90" * 256, "more than 128 arrays and maps"),
        (b"\xdc\x01\x01" + b"\xc0" * 257, "not valid msgpack"),  # array longer than 256
        (b"\xde\x00\x41" + b"\xa1k\xc0" * 65, "not valid msgpack"),  # map over 64 entries
        (b"\xdb\x00\x01\x00\x01" + b"a" * 65537, "not valid msgpack"),  # str over 64 KiB
        (b"\xd4\x01\x00", "not valid msgpack"),  # ext type
        (b"\xdd\xff\xff\xff\xff", "not valid msgpack"),  # array claiming 4 G items
        (b"\xc6\xff\xff\xff\xff\x00", "not valid msgpack"),  # bin claiming 4 GiB
    ],
)
def test_structural_limits(body: bytes, match: str) -> None:
    with pytest.raises((MalformedFrame, InvalidMessage), match=match):
        decode_body(body)


def test_structure_limits_are_configurable() -> None:
    body = msgpack.packb({"type": "hello", "version": 1, "software": "x",
                          "capabilities": ["a", "b", "c"]})
    assert decode_body(body).capabilities == ("a", "b", "c")
    with pytest.raises(MalformedFrame):
        decode_body(body, structure=StructureLimits(max_array_len=2))


def test_feed_accepts_bytearray_and_memoryview() -> None:
    frame = encode(Ping(nonce=9))
    decoder = FrameDecoder()
    assert decoder.feed(bytearray(frame[:5])) == []
    assert decoder.feed(memoryview(frame)[5:]) == [Ping(nonce=9)]


def test_decoder_limit_is_validated() -> None:
    with pytest.raises(ValueError, match="max_frame_bytes 0"):
        FrameDecoder(max_frame_bytes=0)
