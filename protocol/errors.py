"""Typed errors raised by `protocol`, and the error codes that travel in `Error` messages.

Two axes, as in h11:

- *What* was wrong: `FrameTooLarge`, `MalformedFrame`, `UnsupportedVersion`, `UnknownMessageType`,
  `InvalidMessage`, `InvalidTensor`. The pure functions (framing, messages, tensors, codecs) raise
  these; each carries the `ErrorCode` a peer should be told and names the offending value.
- *Whose fault* it was: `LocalProtocolError` (we tried to send something invalid or out of turn)
  and `RemoteProtocolError` (the peer sent it). `Connection` raises these, chaining the "what"
  error as `__cause__` and copying its code.

Every error the package raises derives from `ProtocolError`. `PeerReportedError` is what a
caller raises when a peer answers with an `Error` message (see `messages.Error.to_exception`).
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Codes carried by `Error` messages. Values are stable on the wire; add, never renumber.

    1-99 are protocol violations (this package detects them); 100-199 are node decisions.
    """

    MALFORMED_FRAME = 1
    FRAME_TOO_LARGE = 2
    UNSUPPORTED_VERSION = 3
    UNKNOWN_MESSAGE_TYPE = 4
    INVALID_MESSAGE = 5
    INVALID_TENSOR = 6
    UNSUPPORTED_CODEC = 7
    UNEXPECTED_MESSAGE = 8

    UNKNOWN_SESSION = 100
    MODEL_MISMATCH = 101
    SPAN_NOT_SERVED = 102
    CACHE_FULL = 103
    SESSION_EXPIRED = 104
    OVERLOADED = 105
    POSITION_MISMATCH = 106
    SHUTTING_DOWN = 107
    INTERNAL_ERROR = 108
    PIECE_NOT_HELD = 109  # pieces protocol: this peer does not hold that model, file or piece
    DIAL_BACK_REFUSED = 110  # reach protocol: an address that is not the asker's own, or too many at once


def show_value(value: object) -> str:
    """repr() cut to 80 chars: offending values come from peers and may be huge."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class ProtocolError(Exception):
    """Base of every error `protocol` raises. `code` is what to put in an `Error` reply."""

    code: ErrorCode = ErrorCode.INVALID_MESSAGE

    def __init__(self, message: str, *, code: ErrorCode | None = None):
        if code is not None:
            self.code = code
        super().__init__(message)


class LocalProtocolError(ProtocolError):
    """We tried to send a message that is invalid or that the session state does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes or a message that is invalid or that the session state does not allow."""


class FrameTooLarge(ProtocolError):
    code = ErrorCode.FRAME_TOO_LARGE

    def __init__(self, size: int, limit: int):
        self.size, self.limit = size, limit
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")


class MalformedFrame(ProtocolError):
    """The frame body is not a msgpack map within the structural limits."""

    code = ErrorCode.MALFORMED_FRAME


class UnsupportedVersion(ProtocolError):
    code = ErrorCode.UNSUPPORTED_VERSION

    def __init__(self, version: object, supported: tuple[int, ...]):
        self.version, self.supported = version, supported
        super().__init__(
            f"protocol version {show_value(version)} is not supported; supported: "
            f"{', '.join(map(str, supported))}"
        )


class UnknownMessageType(ProtocolError):
    code = ErrorCode.UNKNOWN_MESSAGE_TYPE

    def __init__(self, message_type: object):
        self.message_type = message_type
        super().__init__(f"unknown message type {show_value(message_type)}")


class InvalidMessage(ProtocolError):
    """A message field is missing, of the wrong type, or out of range."""

    code = ErrorCode.INVALID_MESSAGE


class InvalidTensor(ProtocolError):
    """A tensor's dtype, shape, codec, byte length or values are not acceptable."""

    code = ErrorCode.INVALID_TENSOR


class UnsupportedCodec(InvalidTensor):
    code = ErrorCode.UNSUPPORTED_CODEC

    def __init__(self, codec: object):
        self.codec = codec
        super().__init__(f"unsupported codec id {show_value(codec)}")


class PeerReportedError(ProtocolError):
    """A peer answered with an `Error` message; carries its code, reason and retry hint."""

    def __init__(self, code: ErrorCode | int, reason: str, retry_elsewhere: bool):
        self.reason, self.retry_elsewhere = reason, retry_elsewhere
        self.remote_code = code
        known = code if isinstance(code, ErrorCode) else None
        name = known.name if known is not None else str(code)
        super().__init__(
            f"peer reported {name}: {reason} (retry elsewhere: {retry_elsewhere})",
            code=known if known is not None else ErrorCode.INTERNAL_ERROR,
        )
