"""The wire vocabulary, sans-IO: bytes in, messages out, bytes out.

Messages (`messages`), frames (`framing`), tensors and activation codecs (`tensors`, `codecs`),
the adaptive codec choice (`codec_choice`), the per-hop session state machine (`session`) and an
h11-style `Connection` over it (`connection`). No I/O, trio, torch, time or logging here; the
byte layouts are specified in docs/protocol.md.
"""

from protocol.codec_choice import CodecChoice, CodecCost, CodecSpeed, choose_codec, error_bound
from protocol.codecs import decode_tensor, encode_tensor
from protocol.connection import Connection
from protocol.errors import (
    ErrorCode,
    FrameTooLarge,
    InvalidMessage,
    InvalidTensor,
    LocalProtocolError,
    MalformedFrame,
    PeerReportedError,
    ProtocolError,
    RemoteProtocolError,
    UnknownMessageType,
    UnsupportedCodec,
    UnsupportedVersion,
)
from protocol.framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, StructureLimits, encode
from protocol.messages import (
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
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
from protocol.session import Role, SessionMachine, State
from protocol.tensors import Codec, TensorLimits, WireTensor

__all__ = [
    "CloseSession", "Codec", "CodecChoice", "CodecCost", "CodecSpeed", "Connection",
    "DEFAULT_MAX_FRAME_BYTES", "Error", "ErrorCode", "FrameDecoder", "FrameTooLarge", "Hello",
    "InvalidMessage", "InvalidTensor", "LocalProtocolError", "MalformedFrame", "Message",
    "OpenSession", "PROTOCOL_VERSION", "PeerReportedError", "Ping", "Pong", "ProtocolError",
    "RemoteProtocolError", "Role", "SUPPORTED_VERSIONS", "SessionMachine", "SessionOpened",
    "SpanInfo", "State", "Step", "StepResult", "StructureLimits", "TensorLimits",
    "UnknownMessageType", "UnsupportedCodec", "UnsupportedVersion", "WireTensor", "choose_codec",
    "decode_tensor", "encode", "encode_tensor", "error_bound",
]
