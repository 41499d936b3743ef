"""Tensors as they travel: codec ids, `WireTensor` and its structural validation.

A tensor on the wire is `{dtype, shape, codec, data[, scales]}` (see docs/protocol.md):

- `dtype` is what the receiver materialises: "float32", "float16" or "bfloat16".
- `shape` is a list of at most `MAX_NDIM` non-negative ints.
- `codec` is a `Codec` id saying how `data` (and `scales`) encode the values.

`WireTensor` checks everything that can be checked without building an array (dtype against the
allowed list, shape against limits, byte lengths against the shape, the zstd frame header's
declared size) when it is constructed, so a tensor that exists is safe to decode. Turning arrays
into `WireTensor`s and back is `codecs`'s job.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import zstandard

from protocol.errors import InvalidTensor, UnsupportedCodec

DTYPES = ("float32", "float16", "bfloat16")
MAX_NDIM = 8
BLOCK_SIZE = 64  # values per scale of int8-block64 (int8-block16: 16)
ZSTD_FLAG = 0x10


class Codec(enum.IntEnum):
    """Activation codec ids. Stable on the wire: bit 0x10 means "data is one zstd frame"."""

    FP32 = 1
    FP16 = 2
    BF16 = 3
    INT8_BLOCK64 = 4
    INT8_BLOCK16 = 5
    FP32_ZSTD = FP32 | ZSTD_FLAG
    FP16_ZSTD = FP16 | ZSTD_FLAG
    BF16_ZSTD = BF16 | ZSTD_FLAG
    INT8_BLOCK64_ZSTD = INT8_BLOCK64 | ZSTD_FLAG
    INT8_BLOCK16_ZSTD = INT8_BLOCK16 | ZSTD_FLAG

    @property
    def base(self) -> Codec:
        """The codec without zstd."""
        return Codec(self & ~ZSTD_FLAG)

    @property
    def zstd(self) -> bool:
        return bool(self & ZSTD_FLAG)

    @property
    def label(self) -> str:
        """Human-readable name used in docs and benchmarks, e.g. "int8-block64+zstd"."""
        name = _BASE_LABELS[self.base]
        return f"{name}+zstd" if self.zstd else name

    @property
    def value_bytes(self) -> int:
        """Bytes per value in `data` before zstd."""
        return _VALUE_BYTES[self.base]

    @property
    def block_size(self) -> int:
        """Values per fp16 scale for the int8 blockwise codecs; 0 for the others."""
        return _BLOCK_SIZES[self]

    @property
    def nominal_bytes_per_value(self) -> float:
        """Wire bytes per value without zstd, scales included."""
        return self.value_bytes + (2 / self.block_size if self.block_size else 0.0)


_BASE_LABELS = {
    Codec.FP32: "fp32",
    Codec.FP16: "fp16",
    Codec.BF16: "bf16",
    Codec.INT8_BLOCK64: "int8-block64",
    Codec.INT8_BLOCK16: "int8-block16",
}
_BASE_VALUE_BYTES = {Codec.FP32: 4, Codec.FP16: 2, Codec.BF16: 2, Codec.INT8_BLOCK64: 1, Codec.INT8_BLOCK16: 1}
_BASE_BLOCK_SIZES = {Codec.INT8_BLOCK64: BLOCK_SIZE, Codec.INT8_BLOCK16: 16}
# Per codec (zstd variants included), looked up on every tensor: plain dicts are fastest.
_VALUE_BYTES = {codec: _BASE_VALUE_BYTES[codec.base] for codec in Codec}
_BLOCK_SIZES = {codec: _BASE_BLOCK_SIZES.get(codec.base, 0) for codec in Codec}
_HAS_SCALES = {codec: _BLOCK_SIZES[codec] > 0 for codec in Codec}


def parse_codec(value: object) -> Codec:
    """The `Codec` for a wire id; `UnsupportedCodec` for anything else."""
    if type(value) is not int and not isinstance(value, Codec):
        raise UnsupportedCodec(value)
    try:
        return Codec(value)
    except ValueError:
        raise UnsupportedCodec(value) from None


@dataclass(frozen=True)
class TensorLimits:
    """What a receiver accepts; checked before any byte length is computed or array built."""

    max_ndim: int = MAX_NDIM
    max_elements: int = 1 << 24  # 64 MiB as float32: the default frame limit

    def __post_init__(self) -> None:
        if not 0 <= self.max_ndim <= MAX_NDIM:
            raise ValueError(f"max_ndim {self.max_ndim} is not in [0, {MAX_NDIM}]")
        if self.max_elements < 0:
            raise ValueError(f"max_elements {self.max_elements} is negative")

    def check_shape(self, shape: object) -> tuple[int, ...]:
        """The shape as a tuple of ints, or `InvalidTensor` naming what is wrong with it."""
        if not isinstance(shape, (list, tuple)):
            raise InvalidTensor(f"shape must be a list of ints, got {type(shape).__name__}")
        if len(shape) > self.max_ndim:
            raise InvalidTensor(f"shape has {len(shape)} dims; the limit is {self.max_ndim}")
        for dim in shape:
            if type(dim) is not int or dim < 0:
                raise InvalidTensor(f"shape {list(shape)!r} has a dim that is not an int >= 0")
        numel = math.prod(shape)
        if numel > self.max_elements:
            raise InvalidTensor(
                f"shape {list(shape)!r} has {numel} elements; the limit is {self.max_elements}"
            )
        return tuple(shape)


DEFAULT_LIMITS = TensorLimits()
# What any tensor must satisfy, whatever a receiver's limits: construction checks this.
_STRUCTURAL_LIMITS = TensorLimits(max_elements=1 << 40)


@dataclass(frozen=True)
class WireTensor:
    """An encoded tensor. Construction validates it; `codecs.decode_tensor` builds the array."""

    dtype: str
    shape: tuple[int, ...]
    codec: Codec
    data: bytes
    scales: bytes = b""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidTensor(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if type(self.shape) is not tuple:
            object.__setattr__(self, "shape", _STRUCTURAL_LIMITS.check_shape(self.shape))
        else:
            _STRUCTURAL_LIMITS.check_shape(self.shape)
        if type(self.codec) is not Codec:
            object.__setattr__(self, "codec", parse_codec(self.codec))
        if type(self.data) is not bytes or type(self.scales) is not bytes:
            raise InvalidTensor("tensor data and scales must be bytes")
        self._check_lengths()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def raw_data_bytes(self) -> int:
        """Length of `data` once zstd (if any) is undone."""
        return math.prod(self.shape) * _VALUE_BYTES[self.codec]

    @property
    def scale_bytes(self) -> int:
        if not _HAS_SCALES[self.codec]:
            return 0
        return 2 * -(-math.prod(self.shape) // _BLOCK_SIZES[self.codec])

    @property
    def wire_bytes(self) -> int:
        return len(self.data) + len(self.scales)

    def _check_lengths(self) -> None:
        if len(self.scales) != self.scale_bytes:
            raise InvalidTensor(
                f"{self.codec.label} tensor of shape {list(self.shape)} needs "
                f"{self.scale_bytes} scale bytes, got {len(self.scales)}"
            )
        if self.codec & ZSTD_FLAG:
            check_zstd_header(self.data, self.raw_data_bytes)
        elif len(self.data) != self.raw_data_bytes:
            raise InvalidTensor(
                f"{self.codec.label} tensor of shape {list(self.shape)} needs "
                f"{self.raw_data_bytes} data bytes, got {len(self.data)}"
            )

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "codec": int(self.codec),
            "data": self.data,
        }
        if self.scales:
            wire["scales"] = self.scales
        return wire

    @classmethod
    def from_wire(cls, wire: object, limits: TensorLimits = DEFAULT_LIMITS) -> WireTensor:
        """Validate a decoded msgpack map; shape limits are checked before anything else."""
        if not isinstance(wire, dict):
            raise InvalidTensor(f"a tensor must be a map, got {type(wire).__name__}")
        shape = limits.check_shape(wire.get("shape"))
        return cls(
            dtype=_wire_str(wire.get("dtype")),
            shape=shape,
            codec=parse_codec(wire.get("codec")),
            data=_wire_bytes(wire.get("data"), "data"),
            scales=_wire_bytes(wire.get("scales", b""), "scales"),
        )


def _wire_str(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidTensor(f"dtype must be a string, got {type(value).__name__}")
    return value


def _wire_bytes(value: object, name: str) -> bytes:
    if not isinstance(value, bytes):
        raise InvalidTensor(f"tensor {name} must be bytes, got {type(value).__name__}")
    return value


def check_zstd_header(frame: bytes, expected_size: int) -> None:
    """Require one zstd frame whose header declares exactly `expected_size` bytes of content."""
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as err:
        raise InvalidTensor(f"tensor data is not a zstd frame: {err}") from err
    if declared != expected_size:
        raise InvalidTensor(
            f"zstd frame declares {declared} bytes of content; the shape needs {expected_size}"
        )
