"""The messages peers exchange: frozen dataclasses, their validation, and their wire maps.

Every message carries `version`. On the wire a message is a msgpack map with "type" (the class's
`TYPE`), "version", and one key per field (docs/protocol.md has the table). `message_from_wire`
checks the version, then the type, then each field; unknown keys are ignored, so a newer peer
may add optional fields without a version bump. Validation lives in `__post_init__`, so a
message built locally is checked exactly like one that arrived.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, fields
from typing import Any, ClassVar

from protocol.codec_choice import CodecSpeed
from protocol.errors import (
    ErrorCode,
    InvalidMessage,
    PeerReportedError,
    UnknownMessageType,
    UnsupportedVersion,
)
from protocol.errors import show_value as _show
from protocol.tensors import DEFAULT_LIMITS, Codec, TensorLimits, WireTensor, parse_codec

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
DEFAULT_MAX_FRAME_BYTES = 64 << 20  # a receiver's default frame limit, announced in Hello

MAX_ID_CHARS = 256
MAX_ADDRESS_CHARS = 256
MAX_REASON_CHARS = 4096
MAX_LIST_ITEMS = 64
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
DATA_TOKEN_BYTES = 16  # a data channel offer (SessionOpened): the session's token ...
DATA_KEY_BYTES = 32  # ... and its ChaCha20-Poly1305 key
SWARM_PROOF_BYTES = 32  # Hello.swarm_proof: HMAC-SHA256 of the sender's peer id under the swarm's secret


# --- field checks (raise InvalidMessage naming the field and value) ---------------------------


def _str(owner: object, name: str, value: object, *, max_chars: int, empty: bool) -> None:
    if not isinstance(value, str) or len(value) > max_chars or (not empty and not value):
        raise InvalidMessage(
            f"{type(owner).__name__}.{name} must be a string of {0 if empty else 1}.."
            f"{max_chars} chars, got {_show(value)}"
        )


def _int(owner: object, name: str, value: object, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise InvalidMessage(
            f"{type(owner).__name__}.{name} must be an int in [{lo}, {hi}], got {_show(value)}"
        )


def _float(owner: object, name: str, value: object) -> None:
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise InvalidMessage(
            f"{type(owner).__name__}.{name} must be a finite number >= 0, got {_show(value)}"
        )
    object.__setattr__(owner, name, float(value))


def _bool(owner: object, name: str, value: object) -> None:
    if type(value) is not bool:
        raise InvalidMessage(f"{type(owner).__name__}.{name} must be a bool, got {_show(value)}")


def _span(owner: object, start: object, end: object) -> None:
    _int(owner, "start", start, 0, U32)
    _int(owner, "end", end, 1, U32)
    if end <= start:  # type: ignore[operator]
        raise InvalidMessage(f"{type(owner).__name__} span [{start}, {end}) is empty")


def _hidden(owner: object, value: object) -> None:
    if not isinstance(value, WireTensor) or len(value.shape) != 3:
        raise InvalidMessage(f"{type(owner).__name__}.hidden must be a WireTensor of shape "
                             f"[batch, tokens, hidden], got {_show(value)}")


def _tuple_of(value: object, name: str, item: Callable[[object], Any]) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_LIST_ITEMS:
        raise InvalidMessage(f"{name} must be a list of at most {MAX_LIST_ITEMS}, got "
                             f"{_show(value)}")
    return tuple(item(entry) for entry in value)


# --- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Message:
    """Base of all messages: the protocol version and the wire conversion."""

    TYPE: ClassVar[str] = ""
    # Fields that need more than a scalar copy when read from the wire.
    WIRE_PARSERS: ClassVar[dict[str, Callable[[object, TensorLimits], Any]]] = {}

    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if self.version not in SUPPORTED_VERSIONS or type(self.version) is not int:
            raise UnsupportedVersion(self.version, SUPPORTED_VERSIONS)
        self.validate()

    def validate(self) -> None:
        """Check every field; raises `InvalidMessage`."""

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"type": self.TYPE}
        for field in _fields_of(type(self)):
            wire[field.name] = _value_to_wire(getattr(self, field.name))
        return wire


@functools.cache
def _fields_of(cls: type[Message]) -> tuple[Field, ...]:
    return fields(cls)  # dataclasses.fields rebuilds its tuple on every call; messages are hot


_PLAIN_TYPES = frozenset({str, int, float, bool, bytes, type(None)})  # travel as they are


def _value_to_wire(value: object) -> object:
    kind = type(value)
    if kind in _PLAIN_TYPES:  # most fields: one set lookup (messages are hot)
        return value
    if kind is WireTensor or kind is CodecSpeed:
        return value.to_wire()
    if kind is tuple:
        return [_value_to_wire(item) for item in value]
    if isinstance(value, int):
        return int(value)  # IntEnum members travel as plain ints
    return value


def _codec_ids(value: object, _limits: TensorLimits) -> tuple[Codec, ...]:
    """Known codec ids, in order; ids this version does not know are dropped."""
    def item(entry: object) -> int:
        if type(entry) is not int:
            raise InvalidMessage(f"codec ids must be ints, got {_show(entry)}")
        return entry
    ids = _tuple_of(value, "codecs", item)
    return tuple(Codec(i) for i in ids if i in Codec._value2member_map_)


def _codec_speeds(value: object, _limits: TensorLimits) -> tuple[CodecSpeed, ...]:
    speeds = _tuple_of(value, "codec_speeds", CodecSpeed.from_wire)
    return tuple(speed for speed in speeds if speed is not None)


def _strings(value: object, _limits: TensorLimits) -> tuple[str, ...]:
    return _tuple_of(value, "capabilities", lambda entry: entry)


def _tensor(value: object, limits: TensorLimits) -> WireTensor:
    return WireTensor.from_wire(value, limits)


def _codec(value: object, _limits: TensorLimits) -> Codec:
    return parse_codec(value)


def _error_code(value: object, _limits: TensorLimits) -> ErrorCode | int:
    if type(value) is int and value in ErrorCode._value2member_map_:
        return ErrorCode(value)
    return value  # type: ignore[return-value]  # validated in Error.validate


@dataclass(frozen=True, kw_only=True)
class Hello(Message):
    """First message each way: what this peer speaks and how fast it runs each codec."""

    TYPE: ClassVar[str] = "hello"
    WIRE_PARSERS: ClassVar[dict[str, Callable[[object, TensorLimits], Any]]] = {
        "capabilities": _strings, "codecs": _codec_ids, "codec_speeds": _codec_speeds,
    }

    software: str
    capabilities: tuple[str, ...] = ()
    codecs: tuple[Codec, ...] = ()
    codec_speeds: tuple[CodecSpeed, ...] = ()
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    # household mode: proof that the sender knows the swarm's secret, bound to its (Noise-authenticated)
    # peer id; empty when it claims none. Checked by the receiver (`mesh.swarm_secret`), not here.
    swarm_proof: bytes = b""

    def validate(self) -> None:
        _str(self, "software", self.software, max_chars=MAX_ID_CHARS, empty=True)
        if not isinstance(self.swarm_proof, bytes) or len(self.swarm_proof) not in (0, SWARM_PROOF_BYTES):
            raise InvalidMessage(f"Hello.swarm_proof must be empty or {SWARM_PROOF_BYTES} bytes, got "
                                 f"{_show(self.swarm_proof)}")
        for name in ("capabilities", "codecs", "codec_speeds"):
            if not isinstance(getattr(self, name), tuple) or len(getattr(self, name)) > \
                    MAX_LIST_ITEMS:
                raise InvalidMessage(f"Hello.{name} must be a tuple of at most "
                                     f"{MAX_LIST_ITEMS}, got {_show(getattr(self, name))}")
        for capability in self.capabilities:
            _str(self, "capabilities[]", capability, max_chars=64, empty=False)
        object.__setattr__(self, "codecs", tuple(parse_codec(c) for c in self.codecs))
        for speed in self.codec_speeds:
            if not isinstance(speed, CodecSpeed):
                raise InvalidMessage(f"Hello.codec_speeds holds {_show(speed)}")
        _int(self, "max_frame_bytes", self.max_frame_bytes, 1, U32)


@dataclass(frozen=True, kw_only=True)
class SpanInfo(Message):
    """What a node serves: blocks [start, end) of a model, and its spare capacity."""

    TYPE: ClassVar[str] = "span_info"

    model_id: str
    manifest_hash: str
    start: int
    end: int
    quantization: str = "none"
    throughput: float = 0.0  # tokens per second through the whole span
    free_cache_tokens: int = 0
    sessions: int = 0  # sessions open on the node now: its load, for load-aware routing
    # what computes the span (torch's version, the CPU features the kernels use): nodes with the same
    # string and quantization give bit-identical results, so spot checks between them can be exact
    kernels: str = ""

    def validate(self) -> None:
        _str(self, "model_id", self.model_id, max_chars=MAX_ID_CHARS, empty=False)
        _str(self, "manifest_hash", self.manifest_hash, max_chars=MAX_ID_CHARS, empty=False)
        _span(self, self.start, self.end)
        _str(self, "quantization", self.quantization, max_chars=32, empty=False)
        _str(self, "kernels", self.kernels, max_chars=64, empty=True)
        _float(self, "throughput", self.throughput)
        _int(self, "free_cache_tokens", self.free_cache_tokens, 0, U64)
        _int(self, "sessions", self.sessions, 0, U32)


@dataclass(frozen=True, kw_only=True)
class OpenSession(Message):
    """Client to hop: open an inference session (a KV cache) over blocks [start, end)."""

    TYPE: ClassVar[str] = "open_session"
    WIRE_PARSERS: ClassVar[dict[str, Callable[[object, TensorLimits], Any]]] = {
        "codec": _codec,
    }

    session_id: str
    model_id: str
    manifest_hash: str
    start: int
    end: int
    max_length: int
    batch_size: int = 1
    codec: Codec = Codec.FP16  # what the hop should use for its step results

    def validate(self) -> None:
        _str(self, "session_id", self.session_id, max_chars=MAX_ID_CHARS, empty=False)
        _str(self, "model_id", self.model_id, max_chars=MAX_ID_CHARS, empty=False)
        _str(self, "manifest_hash", self.manifest_hash, max_chars=MAX_ID_CHARS, empty=False)
        _span(self, self.start, self.end)
        _int(self, "max_length", self.max_length, 1, U32)
        _int(self, "batch_size", self.batch_size, 1, 1 << 16)
        object.__setattr__(self, "codec", parse_codec(self.codec))


@dataclass(frozen=True, kw_only=True)
class SessionOpened(Message):
    """Hop to client: the session exists and its cache is reserved.

    A node may offer a data channel for the session's steps (see `mesh.data_channel`): a TCP
    address ("host:port"), a 16-byte token and a 32-byte key. All three or none.
    """

    TYPE: ClassVar[str] = "session_opened"

    session_id: str
    data_address: str = ""
    data_token: bytes = b""
    data_key: bytes = b""

    def validate(self) -> None:
        _str(self, "session_id", self.session_id, max_chars=MAX_ID_CHARS, empty=False)
        _str(self, "data_address", self.data_address, max_chars=MAX_ADDRESS_CHARS, empty=True)
        if not isinstance(self.data_token, bytes) or not isinstance(self.data_key, bytes):
            raise InvalidMessage(f"SessionOpened.data_token and data_key must be bytes, got "
                                 f"{_show(self.data_token)} and {_show(self.data_key)}")
        sizes = (len(self.data_token), len(self.data_key))
        if (self.data_address, sizes) != ("", (0, 0)) and \
                (not self.data_address or sizes != (DATA_TOKEN_BYTES, DATA_KEY_BYTES)):
            raise InvalidMessage(f"SessionOpened offers a data channel only with an address, a {DATA_TOKEN_BYTES}-byte "
                                 f"token and a {DATA_KEY_BYTES}-byte key; got {self.data_address!r} and "
                                 f"{sizes[0]}/{sizes[1]} bytes")


MAX_CHUNKS = 1 << 16


def _chunk_counts(value: object, _limits: TensorLimits) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_CHUNKS:
        raise InvalidMessage(f"Step.chunks must be a list of at most {MAX_CHUNKS} ints, got {_show(value)}")
    return tuple(value)


def _chunks(owner: "Step", chunks: object) -> None:
    if not isinstance(chunks, tuple) or len(chunks) > MAX_CHUNKS:
        raise InvalidMessage(f"Step.chunks must be a tuple of at most {MAX_CHUNKS} ints, got {_show(chunks)}")
    for count in chunks:
        _int(owner, "chunks[]", count, 1, U32)
    tokens = owner.hidden.shape[1]
    if chunks and sum(chunks) != tokens:
        raise InvalidMessage(f"Step.chunks add up to {sum(chunks)} tokens but hidden holds {tokens}")


@dataclass(frozen=True, kw_only=True)
class Step(Message):
    """Client to hop: hidden states [batch, tokens, hidden] starting at `start_position`."""

    TYPE: ClassVar[str] = "step"
    WIRE_PARSERS: ClassVar[dict[str, Callable[[object, TensorLimits], Any]]] = {
        "hidden": _tensor, "chunks": _chunk_counts,
    }

    session_id: str
    step: int
    start_position: int
    hidden: WireTensor
    replay: bool = False  # re-sent history to rebuild a replacement hop's cache
    # Token counts of the original steps when one replay message carries several: the hop runs
    # them one after another, so its cache is bit-identical to the first computation. Empty: one.
    chunks: tuple[int, ...] = ()
    # The step starts before the session's end on purpose (the client kept only some of its last
    # step's tokens, or goes back to a verified step): the hop forgets the positions from
    # `start_position` on first. Without it a step must start exactly where the session ends.
    rewind: bool = False

    def validate(self) -> None:
        _str(self, "session_id", self.session_id, max_chars=MAX_ID_CHARS, empty=False)
        _int(self, "step", self.step, 0, U64)
        _int(self, "start_position", self.start_position, 0, U32)
        _hidden(self, self.hidden)
        _bool(self, "replay", self.replay)
        _chunks(self, self.chunks)
        _bool(self, "rewind", self.rewind)



@dataclass(frozen=True, kw_only=True)
class StepResult(Message):
    """Hop to client: the span's output hidden states for step `step`."""

    TYPE: ClassVar[str] = "step_result"
    WIRE_PARSERS: ClassVar[dict[str, Callable[[object, TensorLimits], Any]]] = {
        "hidden": _tensor,
    }

    session_id: str
    step: int
    hidden: WireTensor
    compute_seconds: float = 0.0
    # The node's own time on the step besides compute, for the client's accounting: from the step's
    # last bytes arriving until the output was computed (reading, checks, decoding, waiting for the
    # compute), and from then until this answer's tensor was encoded (its framing and writing not counted).
    before_compute_seconds: float = 0.0
    after_compute_seconds: float = 0.0

    def validate(self) -> None:
        _str(self, "session_id", self.session_id, max_chars=MAX_ID_CHARS, empty=False)
        _int(self, "step", self.step, 0, U64)
        _hidden(self, self.hidden)
        _float(self, "compute_seconds", self.compute_seconds)
        _float(self, "before_compute_seconds", self.before_compute_seconds)
        _float(self, "after_compute_seconds", self.after_compute_seconds)


@dataclass(frozen=True, kw_only=True)
class CloseSession(Message):
    """Client to hop: the session is over; free its cache."""

    TYPE: ClassVar[str] = "close_session"

    session_id: str

    def validate(self) -> None:
        _str(self, "session_id", self.session_id, max_chars=MAX_ID_CHARS, empty=False)


@dataclass(frozen=True, kw_only=True)
class Error(Message):
    """Either way: something failed. `session_id` is empty for connection-level errors."""

    TYPE: ClassVar[str] = "error"
    WIRE_PARSERS: ClassVar[dict[str, Callable[[object, TensorLimits], Any]]] = {
        "code": _error_code,
    }

    code: ErrorCode | int
    reason: str
    retry_elsewhere: bool = False
    session_id: str = ""

    def validate(self) -> None:
        _int(self, "code", self.code, 0, 0xFFFF)
        if self.code in ErrorCode._value2member_map_:
            object.__setattr__(self, "code", ErrorCode(self.code))
        _str(self, "reason", self.reason, max_chars=MAX_REASON_CHARS, empty=True)
        _bool(self, "retry_elsewhere", self.retry_elsewhere)
        _str(self, "session_id", self.session_id, max_chars=MAX_ID_CHARS, empty=True)

    def to_exception(self) -> PeerReportedError:
        return PeerReportedError(self.code, self.reason, self.retry_elsewhere)


@dataclass(frozen=True, kw_only=True)
class Ping(Message):
    TYPE: ClassVar[str] = "ping"

    nonce: int

    def validate(self) -> None:
        _int(self, "nonce", self.nonce, 0, U64)


@dataclass(frozen=True, kw_only=True)
class Pong(Message):
    TYPE: ClassVar[str] = "pong"

    nonce: int  # the ping's

    def validate(self) -> None:
        _int(self, "nonce", self.nonce, 0, U64)


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (Hello, SpanInfo, OpenSession, SessionOpened, Step, StepResult, CloseSession,
                Error, Ping, Pong)
}  # and the pieces protocol's, registered by `protocol.piece_messages`


def message_from_wire(wire: object, limits: TensorLimits = DEFAULT_LIMITS) -> Message:
    """Build a message from a decoded msgpack map: version, then type, then fields."""
    if not isinstance(wire, dict):
        raise InvalidMessage(f"a message must be a map, got {type(wire).__name__}")
    version = wire.get("version")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersion(version, SUPPORTED_VERSIONS)
    message_type = wire.get("type")
    cls = MESSAGE_TYPES.get(message_type) if isinstance(message_type, str) else None
    if cls is None:
        raise UnknownMessageType(message_type)
    values: dict[str, Any] = {}
    for name, required, parser in _wire_fields(cls):
        if name in wire:
            values[name] = parser(wire[name], limits) if parser else wire[name]
        elif required:
            raise InvalidMessage(f"{cls.__name__} lacks required field {name!r}")
    return cls(**values)


@functools.cache
def _wire_fields(cls: type[Message]) -> tuple[tuple[str, bool, Callable[[object, TensorLimits], Any] | None], ...]:
    """Per field of `cls`: its name, whether the wire must carry it, and its parser (if any)."""
    return tuple((f.name, f.default is MISSING and f.default_factory is MISSING, cls.WIRE_PARSERS.get(f.name))
                 for f in _fields_of(cls))
