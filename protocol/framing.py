"""Frames: a 4-byte big-endian body length, then the body, one msgpack map (one message).

`encode(message) -> bytes` and `FrameDecoder`, which takes the byte stream in any split. The
decoder rejects a length over its limit as soon as the 4 length bytes are in, before reading or
allocating anything for the body, and unpacks bodies with strict structural limits
(`StructureLimits`) so that a small frame cannot expand into a large object graph.

Errors: `FrameTooLarge` breaks the stream (the decoder cannot find the next frame, so every
later call raises it again). `MalformedFrame` and the message/tensor errors consume just the bad
frame; the caller may answer with an `Error` message and go on reading.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgpack

from protocol.errors import FrameTooLarge, MalformedFrame, ProtocolError
from protocol.messages import DEFAULT_MAX_FRAME_BYTES, Message, message_from_wire
from protocol.tensors import DEFAULT_LIMITS, TensorLimits

HEADER_BYTES = 4
MAX_LENGTH_FIELD = (1 << 32) - 1


@dataclass(frozen=True)
class StructureLimits:
    """Bounds on the msgpack object graph of one frame body (part of the protocol spec)."""

    max_containers: int = 128  # arrays + maps in one body
    max_array_len: int = 256
    max_map_len: int = 64
    max_str_len: int = 1 << 16


DEFAULT_STRUCTURE = StructureLimits()


def encode(message: Message, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """The frame for a message; `FrameTooLarge` if its body exceeds `max_frame_bytes`."""
    body = msgpack.packb(message.to_wire(), use_bin_type=True)
    if len(body) > max_frame_bytes:
        raise FrameTooLarge(size=len(body), limit=max_frame_bytes)
    return len(body).to_bytes(HEADER_BYTES, "big") + body


def decode_body(
    body: bytes | memoryview,
    *,
    tensor_limits: TensorLimits = DEFAULT_LIMITS,
    structure: StructureLimits = DEFAULT_STRUCTURE,
) -> Message:
    """The message in one frame body (without its length prefix)."""
    count_container = _container_counter(structure.max_containers)
    try:
        wire = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=len(body),
            max_str_len=structure.max_str_len,
            max_array_len=structure.max_array_len,
            max_map_len=structure.max_map_len,
            max_ext_len=0,
            object_hook=count_container,
            list_hook=count_container,
        )
    except ProtocolError:
        raise
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as err:
        raise MalformedFrame(
            f"frame body of {len(body)} bytes is not valid msgpack within limits: "
            f"{type(err).__name__}: {err}"
        ) from err
    return message_from_wire(wire, tensor_limits)


def _container_counter(limit: int) -> Callable[[object], object]:
    count = 0

    def count_container(container: object) -> object:
        nonlocal count
        count += 1
        if count > limit:
            raise MalformedFrame(f"frame body holds more than {limit} arrays and maps")
        return container

    return count_container


class FrameDecoder:
    """Turns a byte stream, fed in any split, into messages (sans-IO, after h11).

    `receive_data(data)` then `next_message()` until it returns None keeps errors in stream
    order. `feed(data)` does both and returns every complete message; when it raises, messages
    before the bad frame in that same call are lost, so use it only if any error ends the stream.
    """

    def __init__(
        self,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        *,
        tensor_limits: TensorLimits = DEFAULT_LIMITS,
        structure: StructureLimits = DEFAULT_STRUCTURE,
    ):
        if not 0 < max_frame_bytes <= MAX_LENGTH_FIELD:
            raise ValueError(f"max_frame_bytes {max_frame_bytes} is not in [1, 2**32)")
        self.max_frame_bytes = max_frame_bytes
        self.tensor_limits = tensor_limits
        self.structure = structure
        self._buffer = bytearray()
        self._fatal: FrameTooLarge | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes received that are not yet part of a returned message."""
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._fatal is not None:
            raise self._fatal
        self._buffer += data

    def next_message(self) -> Message | None:
        """The next complete message, None if more bytes are needed, or the frame's error."""
        if self._fatal is not None:
            raise self._fatal
        if len(self._buffer) < HEADER_BYTES:
            return None
        length = int.from_bytes(self._buffer[:HEADER_BYTES], "big")
        if length > self.max_frame_bytes:
            self._fatal = FrameTooLarge(size=length, limit=self.max_frame_bytes)
            raise self._fatal
        end = HEADER_BYTES + length
        if len(self._buffer) < end:
            return None
        body = memoryview(self._buffer)[HEADER_BYTES:end]
        try:
            return decode_body(body, tensor_limits=self.tensor_limits, structure=self.structure)
        finally:
            body.release()  # explicitly: a traceback may still reference it
            del self._buffer[:end]

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Add bytes; return every message now complete (see the class doc about errors)."""
        self.receive_data(data)
        messages = []
        while (message := self.next_message()) is not None:
            messages.append(message)
        return messages
