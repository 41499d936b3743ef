"""The GGUF container (llama.cpp's model file): header, metadata and tensor index, read strictly.

Owns parsing a `.gguf` file into its metadata (plain Python values) and `TensorInfo`s whose bytes
are numpy views onto one read-only memory map, so a node touches only the pages of the tensors it
reads. The block formats themselves (sizes, dequantization) come from the `gguf` package.

Why not `gguf.GGUFReader`: it slices its numpy memmap once per metadata item, and opening
SmolLM2-135M's file (49,152 tokens, 48,900 merges) took 5.6 s of one core; this parser takes
about 0.1 s. It also checks every count and size against the bytes left in the file before it
allocates anything, so a file that lies about its sizes gets one `CorruptCheckpoint` line, never a
large allocation or a traceback.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from shard.errors import CorruptCheckpoint

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 used 32-bit counts; llama.cpp has written 3 since 2023
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_KEY_BYTES = 65_535

# Metadata value types (the GGUF spec's gguf_metadata_value_type) -> struct format; 8 and 9
# (string, array) are read separately.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order: [out, in] for a weight (GGUF lists dims innermost first)
    qtype: GGMLQuantizationType
    data: np.ndarray  # uint8 [rows, bytes per row]: a view of the file's bytes

    @property
    def rows(self) -> int:
        return self.data.shape[0]


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    size: int


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse `path`'s header, metadata and tensor index; tensors stay mapped, not read."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            size = file.seek(0, 2)
            if size < 24:
                raise CorruptCheckpoint(f"{path} is not a GGUF file: {size} bytes, shorter than its header")
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as err:
        raise CorruptCheckpoint(f"cannot read {path}: {err.strerror or err}") from err
    return _Parser(path, mapped, size).parse()


def data_start(prefix: bytes, size: int) -> int | None:
    """Where the tensor data of a GGUF file of `size` bytes starts, parsed from its first bytes
    `prefix` (a file being fetched piece by piece): None when `prefix` ends before the tensor index
    does; CorruptCheckpoint when it is not a valid GGUF header."""
    parser = _Parser(Path("(fetched GGUF file)"), prefix, len(prefix))
    try:
        return parser.header()[-1]
    except CorruptCheckpoint:
        if len(prefix) < size:
            return None  # ran out of bytes (or met garbage that more bytes would not fix: the caller bounds it)
        raise


class _Parser:
    def __init__(self, path: Path, mapped: mmap.mmap, size: int):
        self.path, self.mapped, self.size = path, mapped, size
        self.view = memoryview(mapped)
        self.pos = 0

    def fail(self, what: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"{self.path} is not a valid GGUF file: {what} (at byte {self.pos} of {self.size})")

    def parse(self) -> GGUFFile:
        version, metadata, infos, alignment, start = self.header()
        tensors: dict[str, TensorInfo] = {}
        for name, dims, qtype, offset in infos:
            if name in tensors:
                raise self.fail(f"tensor {name!r} appears twice")
            tensors[name] = self.tensor(name, dims, qtype, start, offset, alignment)
        return GGUFFile(self.path, version, metadata, tensors, self.size)

    def header(self) -> tuple[int, dict[str, Any], list[tuple[str, list[int], int, int]], int, int]:
        """Version, metadata, tensor infos, alignment and the data section's start."""
        if bytes(self.view[:4]) != MAGIC:
            raise CorruptCheckpoint(f"{self.path} is not a GGUF file: it starts with {bytes(self.view[:4])!r}, not {MAGIC!r}")
        self.pos = 4
        version = self.scalar("<I")
        if version not in VERSIONS:
            raise CorruptCheckpoint(f"{self.path} is GGUF version {version}; versions {VERSIONS} are supported")
        n_tensors, n_values = self.scalar("<Q"), self.scalar("<Q")
        self.bound(n_values, 13, "metadata count")  # a key of length 0, a type and a 1-byte value
        metadata: dict[str, Any] = {}
        for _ in range(n_values):
            key = self.string("metadata key", MAX_KEY_BYTES)
            if key in metadata:
                raise self.fail(f"metadata key {key!r} appears twice")
            metadata[key] = self.value(self.scalar("<I"), key)
        self.bound(n_tensors, 24, "tensor count")  # name length, dims, type, offset
        infos = [self.tensor_info() for _ in range(n_tensors)]
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise self.fail(f"general.alignment {alignment!r} is not a power of two")
        start = -(-self.pos // alignment) * alignment
        return version, metadata, infos, alignment, start

    def bound(self, count: int, min_bytes: int, what: str) -> None:
        """Refuse a count whose items could not fit in the bytes left: nothing is sized from it first."""
        if count * min_bytes > self.size - self.pos:
            raise self.fail(f"{what} {count} does not fit in the {self.size - self.pos} bytes left")

    def take(self, n: int, what: str) -> memoryview:
        if n > self.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes, the file has {self.size - self.pos} left")
        chunk = self.view[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), "a number"))[0]

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.scalar("<Q")
        if limit is not None and n > limit:
            raise self.fail(f"{what} of {n} bytes (at most {limit})")
        try:
            return str(self.take(n, what), "utf-8")
        except UnicodeDecodeError as err:
            raise self.fail(f"{what} is not UTF-8 ({err.reason})") from None

    def value(self, kind: int, key: str) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string(f"value of {key!r}")
        if kind != _ARRAY:
            raise self.fail(f"metadata {key!r} has unknown type {kind}")
        item, count = self.scalar("<I"), self.scalar("<Q")
        if item in _NUMPY:
            width = np.dtype(_NUMPY[item]).itemsize
            values = np.frombuffer(self.take(count * width, f"array {key!r}"), dtype=_NUMPY[item]).tolist()
            return [bool(v) for v in values] if item == 7 else values
        if item == _STRING:
            self.bound(count, 8, f"array {key!r} count")
            return [self.string(f"item of {key!r}") for _ in range(count)]
        raise self.fail(f"array {key!r} has items of unsupported type {item}")

    def tensor_info(self) -> tuple[str, list[int], int, int]:
        name = self.string("tensor name", MAX_KEY_BYTES)
        n_dims = self.scalar("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
        dims = [self.scalar("<Q") for _ in range(n_dims)]
        return name, dims, self.scalar("<I"), self.scalar("<Q")

    def tensor(self, name: str, dims: list[int], qtype: int, start: int, offset: int, alignment: int) -> TensorInfo:
        try:
            kind = GGMLQuantizationType(qtype)
        except ValueError:
            raise self.fail(f"tensor {name!r} has unknown type {qtype}") from None
        block, type_bytes = GGML_QUANT_SIZES[kind]
        if any(d <= 0 for d in dims) or dims[0] % block:
            raise self.fail(f"tensor {name!r} has shape {dims[::-1]}, not whole blocks of {block} ({kind.name})")
        rows = 1
        for d in dims[1:]:
            rows *= d
        row_bytes = dims[0] // block * type_bytes
        n_bytes = rows * row_bytes
        if offset % alignment:
            raise self.fail(f"tensor {name!r} starts at offset {offset}, not a multiple of the alignment {alignment}")
        if start + offset + n_bytes > self.size:
            raise CorruptCheckpoint(
                f"{self.path}: tensor {name!r} ({kind.name} {dims[::-1]}, {n_bytes} bytes at offset {offset}) "
                f"lies beyond the end of the file ({self.size} bytes): truncated or corrupt")
        data = np.frombuffer(self.mapped, dtype=np.uint8, count=n_bytes, offset=start + offset).reshape(rows, row_bytes)
        return TensorInfo(name, tuple(dims[::-1]), kind, data)
