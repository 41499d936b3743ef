"""The wire vocabulary, sans-IO: bytes in, messages out, bytes out.

Messages (`messages`), frames (`framing`), tensors and activation codecs (`tensors`, `codecs`),
the adaptive codec choice (`codec_choice`, fed by `link_estimate`), the conversation's ids,
capabilities and Hello negotiation (`conversation`), what each error means for a retry (`retry`),
the per-hop session state machine (`session`) and an h11-style `Connection` over it (`connection`). No I/O, trio, torch, time or logging here; the
byte layouts are specified in docs/protocol.md.
"""

from protocol.codec_choice import (
    DEFAULT_CODEC,
    REFERENCE_SPEEDS,
    CodecChoice,
    CodecCost,
    CodecSpeed,
    choose_codec,
    choose_session_codec,
    error_bound,
)
from protocol.codecs import decode_tensor, encode_tensor
from protocol.connection import Connection
from protocol.conversation import (
    AUTO,
    CAPABILITIES,
    CHUNK_INVARIANT,
    DATA_CHANNEL,
    DATA_KEY_BYTES,
    DATA_TOKEN_BYTES,
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    PIECES_PROTOCOL,
    REACH_PROTOCOL,
    REPLAY_CHUNKS,
    REWIND_STEPS,
    SWARM_PROOF_BYTES,
    Agreement,
    negotiate,
    session_codec,
)
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
from protocol.piece_messages import ManifestData, ManifestRequest, PieceData, PieceRequest
from protocol.reach_messages import DialBackRequest, DialBackResult
from protocol.link_estimate import Exchange, LinkEstimate, estimate_link
from protocol.retry import Retry, classify
from protocol.session import Role, SessionMachine, State
from protocol.tensors import Codec, TensorLimits, WireTensor

__all__ = [
    "AUTO", "Agreement", "CAPABILITIES", "CloseSession", "Codec", "CodecChoice", "CodecCost", "CodecSpeed",
    "Connection", "DATA_CHANNEL", "DialBackRequest", "DialBackResult", "DATA_KEY_BYTES", "DATA_TOKEN_BYTES", "DEFAULT_CODEC",
    "DEFAULT_MAX_FRAME_BYTES", "Error", "ErrorCode", "Exchange", "FrameDecoder", "FrameTooLarge", "Hello",
    "INFERENCE_PROTOCOL", "INFO_PROTOCOL", "InvalidMessage", "InvalidTensor", "LinkEstimate",
    "LocalProtocolError", "MalformedFrame", "ManifestData", "ManifestRequest", "Message", "OpenSession",
    "PIECES_PROTOCOL", "PROTOCOL_VERSION", "REACH_PROTOCOL", "PeerReportedError", "PieceData", "PieceRequest", "Ping", "Pong", "ProtocolError", "REFERENCE_SPEEDS", "REPLAY_CHUNKS", "REWIND_STEPS", "CHUNK_INVARIANT",
    "RemoteProtocolError", "Retry", "Role", "SUPPORTED_VERSIONS", "SWARM_PROOF_BYTES", "SessionMachine", "SessionOpened",
    "SpanInfo", "State", "Step", "StepResult", "StructureLimits", "TensorLimits",
    "UnknownMessageType", "UnsupportedCodec", "UnsupportedVersion", "WireTensor", "choose_codec",
    "choose_session_codec", "classify", "decode_tensor", "encode", "encode_tensor", "error_bound",
    "estimate_link", "negotiate", "session_codec",
]
