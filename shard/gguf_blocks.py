"""GGUF tensor types as Hearth weights: which types a file may hold, what each runs as, and the
conversions (dequantized floats for every type; Hearth's int4 codes taken as they are for the
4-bit types whose blocks are groups of 32 with a scale and an offset).

What each type becomes by default (`--quant auto`; docs/design.md has the measured accuracy):
- F32, F16, BF16: float32 weights ("none").
- Q4_0 (w = (q - 8) d), Q4_1 (w = q d + m) and Q4_K (w = q d sc - dmin m, eight sub-blocks of
  32): int4 groups of 32, codes unchanged. Hearth keeps scale and zero in bf16, so the only loss
  is rounding each group's fp16-derived scale and zero to bf16 (relative 2^-9).
- Q8_0, Q5_K, Q6_K: int8 per output channel, requantized from the dequantized weights (Hearth
  has no per-block int8 or 5/6-bit kernel).
Any other quantization asked for (`--quant int8` of a Q4_K file, ...) requantizes the dequantized
weights.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import dequantize as _gguf_dequantize

from shard.gguf_format import TensorInfo

# type -> (Hearth quantization, int4 group size) it runs as by default
NATIVE = {
    Q.F32: "none", Q.F16: "none", Q.BF16: "none",
    Q.Q4_0: "int4", Q.Q4_1: "int4", Q.Q4_K: "int4",
    Q.Q8_0: "int8", Q.Q5_K: "int8", Q.Q6_K: "int8",
}
SUPPORTED = tuple(NATIVE)
INT4_GROUP = 32  # the group of every type read as int4 codes


def type_names(types=SUPPORTED) -> str:
    return ", ".join(t.name for t in types)


def dequantize(info: TensorInfo) -> np.ndarray:
    """float32 [*shape]: the tensor's values (rows may be a selection of the tensor's)."""
    return _gguf_dequantize(info.data, info.qtype).reshape(info.data.shape[0], -1).astype(np.float32)  # a copy, never the map


def int4_groups(info: TensorInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(codes uint8 [rows, in] in 0..15, scales, zeros float32 [rows, in / 32]) with
    w = (code - 8) * scale + zero, exactly the file's values; None for other types."""
    rows = info.data.shape[0]
    if info.qtype == Q.Q4_0:
        blocks = info.data.reshape(rows, -1, 18)
        scale = _f16(blocks[..., 0:2])
        return _nibbles_32(blocks[..., 2:]), scale, np.zeros_like(scale)
    if info.qtype == Q.Q4_1:
        blocks = info.data.reshape(rows, -1, 20)
        scale, low = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
        return _nibbles_32(blocks[..., 4:]), scale, low + 8 * scale
    if info.qtype == Q.Q4_K:
        return _q4_k(info.data.reshape(rows, -1, 144))
    return None


def _f16(pair: np.ndarray) -> np.ndarray:
    """[..., 2] bytes of little-endian fp16 -> float32 [...]."""
    return np.ascontiguousarray(pair).view("<f2")[..., 0].astype(np.float32)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """Q4_0/Q4_1 block payloads [rows, blocks, 16] -> codes [rows, blocks * 32]: byte j holds
    element j in its low nibble and element j + 16 in its high one."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(qs.shape[0], -1)


def _q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K super-blocks [rows, n, 144] (d, dmin fp16; 12 bytes of 6-bit sub-block scales and
    mins; 128 bytes of codes) -> codes and per-32 scales and zeros."""
    rows, n, _ = blocks.shape
    d, dmin = _f16(blocks[..., 0:2])[..., None], _f16(blocks[..., 2:4])[..., None]
    packed = blocks[..., 4:16].astype(np.uint8)
    sc = np.concatenate([packed[..., 0:4] & 63, (packed[..., 8:12] & 15) | ((packed[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([packed[..., 4:8] & 63, (packed[..., 8:12] >> 4) | ((packed[..., 4:8] >> 6) << 4)], axis=-1)
    qs = blocks[..., 16:].reshape(rows, n, 4, 32)  # 64 elements per 32 bytes: low nibbles first
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(rows, n * 256)
    scale = d * sc.astype(np.float32)  # [rows, n, 8]
    zero = 8 * scale - dmin * mn.astype(np.float32)
    return codes, scale.reshape(rows, -1), zero.reshape(rows, -1)
