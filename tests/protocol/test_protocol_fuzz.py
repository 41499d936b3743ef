"""Fuzzing: random and mutated frames raise only ProtocolError, never hang, never blow up memory.

More than 20,000 frames per run (seeded, so every run sees the same ones);
benchmarks/fuzz_protocol.py runs a million.
"""

from __future__ import annotations

import collections
import random
import time
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_strategies import PROTOCOL_PROFILE

from protocol import (
    Codec,
    FrameDecoder,
    Ping,
    ProtocolError,
    Step,
    TensorLimits,
    WireTensor,
    decode_tensor,
    encode,
    encode_tensor,
)
from protocol.codecs import ZstdContext
from protocol.framing import decode_body
from protocol.messages import MESSAGE_TYPES
from protocol.fuzzing import check_frame, frame_of, fuzz_frames, sample_message

FRAMES_PER_SEED = 5_500
SEEDS = (1, 2, 3, 4)  # 22,000 frames


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzzed_frames_raise_only_protocol_errors(seed: int) -> None:
    rng = random.Random(seed)
    zstd = ZstdContext()
    outcomes: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    slowest = 0.0
    for kind, frame in fuzz_frames(rng, FRAMES_PER_SEED):
        started = time.perf_counter()
        outcomes[check_frame(frame, rng, zstd)] += 1  # anything but ProtocolError propagates
        slowest = max(slowest, time.perf_counter() - started)
        kinds[kind] += 1
    assert sum(outcomes.values()) == FRAMES_PER_SEED
    assert set(kinds) == {"valid", "bytes", "fields", "version", "nesting", "bomb", "msgpack"}
    assert outcomes["ok"] >= kinds["valid"]  # every valid frame decodes
    for expected in ("MalformedFrame", "FrameTooLarge", "InvalidMessage", "InvalidTensor",
                     "UnknownMessageType", "UnsupportedVersion", "partial"):
        assert outcomes[expected] > 0, outcomes
    assert slowest < 1.0, f"one frame took {slowest:.3f} s"


def test_one_stream_survives_recoverable_bad_frames() -> None:
    """Valid frames between bad (but complete) ones still come out, in order."""
    rng = random.Random(5)
    decoder = FrameDecoder()
    sent, received, errors = [], [], 0
    for kind, frame in fuzz_frames(rng, 2_000):
        if len(frame) < 4 or int.from_bytes(frame[:4], "big") != len(frame) - 4:
            continue  # truncated frames and lying lengths desynchronise a stream by design
        if kind == "valid":
            sent.append(frame)
        decoder.receive_data(frame)
        while True:
            try:
                message = decoder.next_message()
            except ProtocolError:
                errors += 1
                continue
            if message is None:
                break
            received.append(message)
    assert errors > 500
    decoded_valid = [encode(m) for m in received]
    position = 0
    for frame in sent:  # every valid frame appears, in order, among what was received
        position = decoded_valid.index(frame, position) + 1


def test_hostile_frames_allocate_little_beyond_their_size() -> None:
    rng = random.Random(6)
    zstd = ZstdContext()
    worst = 0.0
    tracemalloc.start()
    try:
        for _, frame in fuzz_frames(rng, 1_500):
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            check_frame(frame, rng, zstd)
            peak = tracemalloc.get_traced_memory()[1] - before
            worst = max(worst, peak / (len(frame) + 65536))
    finally:
        tracemalloc.stop()
    # Decoded tensors are at most 2**16 values (fuzz limits): 256 KiB as float32.
    assert worst < 8, worst
    print(f"worst peak allocation: {worst:.2f} x (frame bytes + 64 KiB)")


def test_a_length_near_the_limit_allocates_nothing_for_the_body() -> None:
    decoder = FrameDecoder()  # 64 MiB limit
    tracemalloc.start()
    try:
        assert decoder.feed((60 << 20).to_bytes(4, "big") + b"\x80" * 100) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10 and decoder.buffered_bytes == 104


def test_zstd_bombs_are_refused_before_decompressing() -> None:
    bomb = ZstdContext().compress(bytes(1 << 25))  # 32 MiB of zeros in ~1 KiB
    wire = {"dtype": "float32", "shape": [1 << 24], "codec": int(Codec.FP16_ZSTD), "data": bomb}
    with pytest.raises(ProtocolError, match="elements; the limit is 65536"):
        WireTensor.from_wire(wire, TensorLimits(max_elements=1 << 16))
    wire["shape"] = [1 << 10]  # the header's declared size no longer matches
    with pytest.raises(ProtocolError, match="declares 33554432 bytes"):
        WireTensor.from_wire(wire)


def test_many_frames_in_one_feed() -> None:
    rng = random.Random(8)
    messages = [sample_message(rng) for _ in range(300)] + [Ping(nonce=7)]
    stream = b"".join(encode(m) for m in messages)
    assert FrameDecoder().feed(stream) == messages


def test_frame_of_helper_matches_encode() -> None:
    step = Step(session_id="s", step=1, start_position=0,
                hidden=encode_tensor(np.zeros((1, 1, 64), np.float32), Codec.BF16))
    assert frame_of(msgpack.packb(step.to_wire(), use_bin_type=True)) == encode(step)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
field_names = st.sampled_from(
    ["type", "version", "session_id", "step", "start_position", "hidden", "replay", "dtype",
     "shape", "codec", "data", "scales", "code", "reason", "codecs", "codec_speeds", "nonce"]
)


@settings(PROTOCOL_PROFILE, max_examples=500)
@given(st.binary(max_size=300))
def test_arbitrary_bodies_raise_only_protocol_errors(body: bytes) -> None:
    try:
        decode_body(body)
    except ProtocolError:
        pass


@settings(PROTOCOL_PROFILE, max_examples=300)
@given(st.sampled_from(sorted(MESSAGE_TYPES)), st.dictionaries(field_names, msgpack_values))
def test_arbitrary_fields_raise_only_protocol_errors(message_type: str, fields: dict) -> None:
    body = msgpack.packb({"type": message_type, "version": 1, **fields}, use_bin_type=True)
    try:
        message = decode_body(body)
    except ProtocolError:
        return
    hidden = getattr(message, "hidden", None)
    if hidden is not None:
        try:
            decode_tensor(hidden)
        except ProtocolError:
            pass
