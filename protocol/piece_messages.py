"""The pieces protocol's messages: a model's manifest and its pieces, fetched from peers that hold them.

A node that lacks a model's files fetches them from its peers (`PIECES_PROTOCOL`): the manifest
first (`ManifestRequest` -> `ManifestData`, which the fetcher checks against the digest it was
given, with a bitmap per file of the pieces the peer holds), then pieces (`PieceRequest` ->
`PieceData`, each checked against the manifest's hash). Defined like `protocol.messages`'s and
registered in its `MESSAGE_TYPES`, so `message_from_wire` reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from protocol.errors import InvalidMessage
from protocol.errors import show_value as _show
from protocol.messages import MAX_ID_CHARS, MESSAGE_TYPES, U32, Message, _bool, _int, _str
from protocol.tensors import TensorLimits

MAX_MANIFEST_BYTES = 16 << 20  # a model manifest (per-piece hashes: about 16 KiB per GB of weights)
MAX_PIECE_BYTES = 64 << 20  # the largest piece a manifest may define (`shard.manifest`)
MAX_PATH_CHARS = 1024
MAX_FILES = 4096  # files of one model a ManifestData lists holdings of


def _blob(owner: object, name: str, value: object, max_bytes: int) -> None:
    if not isinstance(value, bytes) or len(value) > max_bytes:
        raise InvalidMessage(f"{type(owner).__name__}.{name} must be at most {max_bytes} bytes, got {_show(value)}")


def _bitmaps(value: object, _limits: TensorLimits) -> tuple[bytes, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_FILES:
        raise InvalidMessage(f"ManifestData.have must be a list of at most {MAX_FILES} bitmaps, got {_show(value)}")
    return tuple(value)


@dataclass(frozen=True, kw_only=True)
class ManifestRequest(Message):
    """Fetcher to holder (pieces protocol): the manifest of a model, and which of its pieces you hold
    (`bitmaps_only`: the fetcher has the manifest already; send only the bitmaps)."""

    TYPE: ClassVar[str] = "manifest_request"

    manifest_hash: str
    bitmaps_only: bool = False

    def validate(self) -> None:
        _str(self, "manifest_hash", self.manifest_hash, max_chars=MAX_ID_CHARS, empty=False)
        _bool(self, "bitmaps_only", self.bitmaps_only)


@dataclass(frozen=True, kw_only=True)
class ManifestData(Message):
    """Holder to fetcher: the manifest's canonical bytes (the fetcher checks them against the digest;
    empty when asked for the bitmaps only)
    and, per file in the manifest's sorted order, a bitmap of the pieces held (bit i of byte i // 8,
    least significant first)."""

    TYPE: ClassVar[str] = "manifest_data"
    WIRE_PARSERS: ClassVar[dict[str, Callable[[object, TensorLimits], Any]]] = {"have": _bitmaps}

    manifest_hash: str
    manifest: bytes
    have: tuple[bytes, ...] = ()

    def validate(self) -> None:
        _str(self, "manifest_hash", self.manifest_hash, max_chars=MAX_ID_CHARS, empty=False)
        _blob(self, "manifest", self.manifest, MAX_MANIFEST_BYTES)
        if not isinstance(self.have, tuple) or len(self.have) > MAX_FILES:
            raise InvalidMessage(f"ManifestData.have must hold at most {MAX_FILES} bitmaps, got {_show(self.have)}")
        for bitmap in self.have:
            _blob(self, "have", bitmap, MAX_MANIFEST_BYTES // 64)


@dataclass(frozen=True, kw_only=True)
class PieceRequest(Message):
    """Fetcher to holder: piece `index` of file `path` of the model."""

    TYPE: ClassVar[str] = "piece_request"

    manifest_hash: str
    path: str
    index: int

    def validate(self) -> None:
        _str(self, "manifest_hash", self.manifest_hash, max_chars=MAX_ID_CHARS, empty=False)
        _str(self, "path", self.path, max_chars=MAX_PATH_CHARS, empty=False)
        _int(self, "index", self.index, 0, U32)


@dataclass(frozen=True, kw_only=True)
class PieceData(Message):
    """Holder to fetcher: the piece's bytes (the fetcher checks them against the manifest's hash)."""

    TYPE: ClassVar[str] = "piece_data"

    manifest_hash: str
    path: str
    index: int
    data: bytes

    def validate(self) -> None:
        _str(self, "manifest_hash", self.manifest_hash, max_chars=MAX_ID_CHARS, empty=False)
        _str(self, "path", self.path, max_chars=MAX_PATH_CHARS, empty=False)
        _int(self, "index", self.index, 0, U32)
        _blob(self, "data", self.data, MAX_PIECE_BYTES)


MESSAGE_TYPES.update({cls.TYPE: cls for cls in (ManifestRequest, ManifestData, PieceRequest, PieceData)})
