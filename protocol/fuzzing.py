"""Testing tools shipped with the package (after trio.testing): valid and hostile frames.

`sample_message(rng)` builds a random valid message of any type; `fuzz_frames(rng, count)`
yields `(kind, frame_bytes)` pairs: valid frames, and frames truncated, bit-flipped, with lying
or oversized lengths, wrong field types, huge shapes, lying byte counts, deep nesting, container
bombs and invalid msgpack. `check_frame` feeds one to a fresh decoder in random splits and
decodes every tensor in what comes out: it must return or raise a `ProtocolError`, nothing else.
The tests under tests/protocol and benchmarks/fuzz_protocol.py drive these with a seeded
`random.Random`; nothing here reads a clock or global randomness.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import numpy as np

from protocol.codec_choice import CodecSpeed
from protocol.codecs import ZstdContext, decode_tensor, encode_tensor
from protocol.errors import ErrorCode, ProtocolError
from protocol.framing import FrameDecoder, encode
from protocol.messages import (
    CloseSession,
    Error,
    Hello,
    Message,
    OpenSession,
    Ping,
    Pong,
    SessionOpened,
    SpanInfo,
    Step,
    StepResult,
)
from protocol.tensors import Codec, TensorLimits, WireTensor

FUZZ_MAX_FRAME_BYTES = 1 << 20
FUZZ_TENSOR_LIMITS = TensorLimits(max_elements=1 << 16)


# --- valid messages ---------------------------------------------------------------------------


def sample_tensor(rng: random.Random, zstd: ZstdContext | None = None) -> WireTensor:
    """Small random hidden states [batch, tokens, hidden] in a random codec."""
    low = 0 if rng.random() < 0.05 else 1
    shape = (rng.randint(low, 4), rng.randint(low, 8), rng.choice((1, 7, 64, 130)))
    values = np.random.default_rng(rng.getrandbits(32)).standard_normal(shape)
    array = (values * rng.choice((1e-3, 1.0, 30.0))).astype(rng.choice((np.float32, np.float16)))
    codec = rng.choice(list(Codec))
    dtype = "bfloat16" if array.dtype == np.float32 and rng.random() < 0.3 else None
    return encode_tensor(array, codec, dtype=dtype, zstd_context=zstd)


def _text(rng: random.Random, low: int = 1, high: int = 12) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789-_/.é中"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def sample_message(rng: random.Random, zstd: ZstdContext | None = None) -> Message:
    """A random valid message of a random type."""
    return rng.choice(_BUILDERS)(rng, zstd)


def _hello(rng: random.Random, _zstd: ZstdContext | None) -> Message:
    codecs = tuple(rng.sample(list(Codec), rng.randint(0, len(Codec))))
    speeds = tuple(CodecSpeed(c, rng.uniform(0, 1e5), rng.uniform(0, 50), rng.uniform(0, 1e5),
                              rng.uniform(0, 50)) for c in codecs[: rng.randint(0, len(codecs))])
    capabilities = tuple(_text(rng) for _ in range(rng.randint(0, 4)))
    return Hello(software=_text(rng, 0), capabilities=capabilities, codecs=codecs,
                 codec_speeds=speeds, max_frame_bytes=rng.randint(1, (1 << 32) - 1))


def _span_info(rng: random.Random, _zstd: ZstdContext | None) -> Message:
    start = rng.randint(0, 80)
    return SpanInfo(model_id=_text(rng), manifest_hash=_text(rng, 64, 64), start=start,
                    end=start + rng.randint(1, 40),
                    quantization=rng.choice(("none", "int8", "int4")),
                    throughput=rng.uniform(0, 1000), free_cache_tokens=rng.randint(0, 1 << 40),
                    sessions=rng.randint(0, 64))


def _open_session(rng: random.Random, _zstd: ZstdContext | None) -> Message:
    start = rng.randint(0, 80)
    return OpenSession(session_id=_text(rng), model_id=_text(rng), manifest_hash=_text(rng),
                       start=start, end=start + rng.randint(1, 40),
                       max_length=rng.randint(1, 8192), batch_size=rng.randint(1, 8),
                       codec=rng.choice(list(Codec)))


def _step(rng: random.Random, zstd: ZstdContext | None) -> Message:
    return Step(session_id=_text(rng), step=rng.randint(0, 1 << 63),
                start_position=rng.randint(0, 4096), hidden=sample_tensor(rng, zstd),
                replay=rng.random() < 0.5)


def _step_result(rng: random.Random, zstd: ZstdContext | None) -> Message:
    return StepResult(session_id=_text(rng), step=rng.randint(0, 1 << 63),
                      hidden=sample_tensor(rng, zstd), compute_seconds=rng.uniform(0, 2))


def _error(rng: random.Random, _zstd: ZstdContext | None) -> Message:
    code = rng.choice(list(ErrorCode)) if rng.random() < 0.9 else rng.randint(0, 0xFFFF)
    return Error(code=code, reason=_text(rng, 0, 60), retry_elsewhere=rng.random() < 0.5,
                 session_id=_text(rng, 0))


_BUILDERS: tuple[Callable[[random.Random, ZstdContext | None], Message], ...] = (
    _hello, _span_info, _open_session, _step, _step_result, _error,
    lambda rng, _z: SessionOpened(session_id=_text(rng)),
    lambda rng, _z: CloseSession(session_id=_text(rng)),
    lambda rng, _z: Ping(nonce=rng.getrandbits(64)),
    lambda rng, _z: Pong(nonce=rng.getrandbits(64)),
)


# --- hostile frames ---------------------------------------------------------------------------


def frame_of(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(10 if depth < 3 else 8)
    return [
        lambda: None, lambda: rng.random() < 0.5, lambda: rng.randint(-(1 << 63), (1 << 64) - 1),
        lambda: rng.uniform(-1e300, 1e300), lambda: _text(rng, 0, 30),
        lambda: rng.randbytes(rng.randint(0, 40)), lambda: float("nan"), lambda: rng.randint(-5, 5),
        lambda: [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))],
        lambda: {_text(rng): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))},
    ][kind]()


def _mutate_wire(rng: random.Random, wire: dict[str, Any]) -> dict[str, Any]:
    """Replace, drop or add one field, possibly inside the tensor map."""
    target = wire
    if "hidden" in wire and rng.random() < 0.6:
        target = wire["hidden"]
    key = rng.choice(list(target))
    action = rng.randrange(4)
    if action == 0:
        del target[key]
    elif action == 1:
        target[key] = _random_value(rng)
    elif action == 2:
        target[_text(rng)] = _random_value(rng)
    else:
        _tensor_lie(rng, target) if "shape" in target else target.update(type=_text(rng))
    return wire


def _tensor_lie(rng: random.Random, tensor: dict[str, Any]) -> None:
    """Huge or odd shapes, byte counts that do not match, forged zstd frames."""
    choice = rng.randrange(6)
    if choice == 0:
        huge = (1 << 31, 1 << 40, (1 << 64) - 1)
        tensor["shape"] = [rng.choice(huge) for _ in range(rng.randint(1, 4))]
    elif choice == 1:
        tensor["shape"] = [2] * rng.randint(9, 200)
    elif choice == 2:
        cut = rng.randint(0, len(tensor["data"]))
        data = tensor["data"]
        tensor["data"] = data[:cut] if rng.random() < 0.5 else data + b"\0" * cut
    elif choice == 3:
        tensor["scales"] = rng.randbytes(rng.randint(0, 64))
    elif choice == 4:
        tensor["codec"] = rng.choice((Codec.FP16_ZSTD, Codec.INT8_BLOCK64_ZSTD, 0, 99, -1, 255))
    else:
        tensor["data"] = _forged_zstd(rng, tensor)


def _forged_zstd(rng: random.Random, tensor: dict[str, Any]) -> bytes:
    """A zstd frame whose declared size or content disagrees with the shape, or a bomb."""
    size = rng.choice((0, 1, 1000, 1 << 20, 1 << 30))
    frame = ZstdContext().compress(b"\0" * min(size, 1 << 20))
    if rng.random() < 0.5:
        frame = bytearray(frame)
        frame[rng.randrange(4, len(frame))] ^= 1 << rng.randrange(8)
        frame = bytes(frame)
    return frame + (rng.randbytes(3) if rng.random() < 0.2 else b"")


def _deep_nesting(rng: random.Random) -> bytes:
    depth = rng.choice((20, 200, 1000, 5000))
    opener = rng.choice((b"\x91", b"\x81\xa1k"))
    return frame_of(opener * depth + b"\xc0")


def _container_bomb(rng: random.Random) -> bytes:
    count = rng.choice((200, 1000, 60000))
    inner = b"\x90" if rng.random() < 0.5 else b"\x80"
    return frame_of(b"\xdc" + count.to_bytes(2, "big") + inner * count)


def _invalid_msgpack(rng: random.Random) -> bytes:
    choice = rng.randrange(5)
    if choice == 0:
        return frame_of(rng.randbytes(rng.randint(0, 200)))
    if choice == 1:
        return frame_of(b"\xc1" + rng.randbytes(10))  # never-used type byte
    if choice == 2:  # a str or bin header claiming 4 GiB
        return frame_of(rng.choice((b"\xdb", b"\xc6")) + b"\xff\xff\xff\xff" + rng.randbytes(8))
    if choice == 3:  # array/map headers claiming 4 G entries
        return frame_of(rng.choice((b"\xdd", b"\xdf")) + b"\xff\xff\xff\xff" + b"\xc0" * 8)
    return frame_of(b"\xd4\x01\x00" if rng.random() < 0.5 else msgpack.packb([1, 2]) + b"\xc0")


def _byte_mutation(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    choice = rng.randrange(5)
    if choice == 0:  # truncate
        return bytes(data[: rng.randrange(len(data))])
    if choice == 1:  # flip bits in the body
        for _ in range(rng.randint(1, 8)):
            index = rng.randrange(4, len(data)) if len(data) > 4 else 0
            data[index] ^= 1 << rng.randrange(8)
        return bytes(data)
    if choice == 2:  # lying length, body unchanged
        return rng.randrange(len(data) * 2 + 8).to_bytes(4, "big") + bytes(data[4:])
    if choice == 3:  # oversized length
        length = rng.randint(FUZZ_MAX_FRAME_BYTES + 1, (1 << 32) - 1)
        return length.to_bytes(4, "big") + bytes(data[4:40])
    body = data[4:]  # insert or delete bytes, length fixed up
    index = rng.randrange(len(body) + 1)
    if rng.random() < 0.5:
        body[index:index] = rng.randbytes(rng.randint(1, 16))
    else:
        del body[index : index + rng.randint(1, 16)]
    return frame_of(bytes(body))


def fuzz_frames(rng: random.Random, count: int) -> Iterator[tuple[str, bytes]]:
    """`count` (kind, frame) pairs, valid and hostile, all derived from `rng`."""
    zstd = ZstdContext()
    for _ in range(count):
        kind = rng.choices(_KINDS, _WEIGHTS)[0]
        if kind in ("bytes", "fields") and rng.random() < 0.5:
            message = rng.choice((_step, _step_result))(rng, zstd)  # most bytes are tensors
        else:
            message = sample_message(rng, zstd)
        if kind == "valid":
            yield kind, encode(message)
        elif kind == "bytes":
            yield kind, _byte_mutation(rng, encode(message))
        elif kind == "fields":
            wire = _mutate_wire(rng, message.to_wire())
            yield kind, frame_of(msgpack.packb(wire, use_bin_type=True))
        elif kind == "version":
            wire = message.to_wire() | {"version": rng.choice((0, 2, 1 << 40, "1", None))}
            yield kind, frame_of(msgpack.packb(wire, use_bin_type=True))
        else:
            yield kind, _STRUCTURAL[kind](rng)


_STRUCTURAL = {"nesting": _deep_nesting, "bomb": _container_bomb, "msgpack": _invalid_msgpack}
_KINDS = ("valid", "bytes", "fields", "version", "nesting", "bomb", "msgpack")
_WEIGHTS = (10, 35, 35, 5, 5, 5, 5)


def check_frame(frame: bytes, rng: random.Random, zstd: ZstdContext | None = None) -> str:
    """Feed `frame` in random splits to a fresh decoder and decode its tensors.

    Returns "ok" (messages came out), "partial" (the decoder waits for more bytes) or the name
    of the `ProtocolError` raised. Any other exception propagates: that is a bug.
    """
    decoder = FrameDecoder(FUZZ_MAX_FRAME_BYTES, tensor_limits=FUZZ_TENSOR_LIMITS)
    try:
        messages = []
        position = 0
        while position < len(frame):
            step = rng.randint(1, max(1, len(frame) // 2))
            messages += decoder.feed(frame[position : position + step])
            position += step
        for message in messages:
            hidden = getattr(message, "hidden", None)
            if hidden is not None:
                decode_tensor(hidden, zstd_context=zstd)
    except ProtocolError as err:
        return type(err).__name__
    return "ok" if messages else "partial"
