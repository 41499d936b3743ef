"""The compiled kernels (shard/csrc/qmatmul.c: quantized matmuls, RMSNorm; shard/csrc/attention.c:
attention one query row at a time; shard/csrc/block_ops.c: rotary embedding, SwiGLU), loaded with
ctypes.

setup.py builds `shard/_qkernels*.so` for the installing CPU; when it is missing or does not load,
`available()` is False, `why_unavailable()` says why, and shard/quant.py runs pure torch.
Every call checks shapes, dtypes, contiguity and bounds here, so no bad pointer reaches C.
Threads: torch's intra-op count (`torch.get_num_threads()`), on the OpenMP pool torch loaded.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path

import torch
from torch import Tensor

from shard.errors import QuantizationError

ABI = 7
BLOCK = 32  # activation values per scale, as in the C file
TILE = 16  # int4 output rows per weight tile, as in the C file
# Largest K for which the int8 path's int32 sums cannot overflow (255 * 128 * K < 2**31: the
# VNNI path sums (a + 128) * w before taking 128 * sum(w) off).
MAX_INT8_K = (2**31 - 1) // (255 * 128)
_DISABLE_ENV = "HEARTH_NO_KERNELS"  # set to run pure torch (comparisons, debugging)

_i64, _int, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


def _find() -> Path | None:
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_qkernels{suffix}"
        if candidate.exists():
            return candidate
    return None


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get(_DISABLE_ENV):
        return None, f"disabled by {_DISABLE_ENV}"
    path = _find()
    if path is None:
        return None, "shard/_qkernels was not built (reinstall with a C compiler: pip install -e .)"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        return None, f"cannot load {path.name}: {err}"
    lib.hq_abi.restype = _int
    if lib.hq_abi() != ABI:
        return None, f"{path.name} is ABI {lib.hq_abi()}, expected {ABI} (rebuild: pip install -e .)"
    lib.hq_isa.restype = ctypes.c_char_p
    lib.hq_i8_mm.argtypes = [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int]
    lib.hq_i8_mm.restype = _int
    lib.hq_i8_quantize.argtypes = [_ptr, _ptr, _ptr, _i64, _i64]
    lib.hq_i8_quantize.restype = None
    lib.hq_i8_linear.argtypes = [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int]
    lib.hq_i8_linear.restype = _int
    lib.hq_i4_mm.argtypes = [_ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _int]
    lib.hq_i4_mm.restype = _int
    lib.hq_i4_tile_bytes.argtypes = [_i64, _i64]
    lib.hq_i4_tile_bytes.restype = _i64
    lib.hq_rms_norm.argtypes = [_ptr, _ptr, _ptr, _i64, _i64, ctypes.c_float]
    lib.hq_rms_norm.restype = None
    lib.ha_attend.argtypes = [_ptr, _ptr, _ptr, _ptr] + [_i64] * 11 + [ctypes.c_float, _int]
    lib.ha_attend.restype = _int
    lib.hb_rope.argtypes = [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _i64]
    lib.hb_rope.restype = None
    lib.hb_silu_mul.argtypes = [_ptr, _ptr, _i64, _i64]
    lib.hb_silu_mul.restype = None
    return lib, ""


_LIB, _WHY = _load()


def available() -> bool:
    return _LIB is not None


def why_unavailable() -> str:
    return _WHY


def isa() -> str:
    """The CPU features the compiled kernels use ("avx2+avx512vnni", ...), or "torch" without them."""
    return "torch" if _LIB is None else _LIB.hq_isa().decode()


def describe() -> str:
    """One line for logs: which kernels run."""
    if _LIB is None:
        return f"pure torch ({_WHY})"
    return f"compiled ({_LIB.hq_isa().decode()})"


def _need(tensor: Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
        raise QuantizationError(
            f"{name} is {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape}"
        )
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise QuantizationError(f"{name} must be a contiguous CPU tensor")


def i8_fits(in_features: int) -> bool:
    return _LIB is not None and in_features % BLOCK == 0 and in_features <= MAX_INT8_K


def i4_fits(in_features: int, group_size: int) -> bool:
    return _LIB is not None and group_size % BLOCK == 0 and in_features % group_size == 0


def _activations(x: Tensor, k: int) -> Tensor:
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k or x.device.type != "cpu":
        raise QuantizationError(
            f"activations are {x.dtype} {tuple(x.shape)}, expected float32 [rows, {k}]"
        )
    return x.contiguous()


def i8_mm(codes: Tensor, weight: Tensor) -> Tensor:
    """codes int8 [M, K] @ weight int8 [N, K]^T -> exact int32 [M, N] (what torch._int_mm gives)."""
    rows, k = codes.shape
    n = weight.shape[0]
    if not i8_fits(k):
        raise QuantizationError(f"no compiled int8 kernel for in_features {k}")
    _need(codes, "activation codes", torch.int8, (rows, k))
    _need(weight, "int8 weight", torch.int8, (n, k))
    out = torch.empty(rows, n, dtype=torch.int32)
    if _LIB.hq_i8_mm(codes.data_ptr(), weight.data_ptr(), None, out.data_ptr(), rows, n, k,
                     torch.get_num_threads()):
        raise MemoryError("int8 kernel: no memory for its scratch buffer")
    return out


def i8_quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row int8 activations, bit for bit what shard.quant's torch code computes:
    (codes int8 [M, K], steps fp32 [M, 1])."""
    if _LIB is None:
        raise QuantizationError(f"no compiled kernels: {_WHY}")
    x = _activations(x, x.shape[-1] if x.dim() == 2 else -1)
    rows, k = x.shape
    codes = torch.empty(rows, k, dtype=torch.int8)
    steps = torch.empty(rows, 1, dtype=torch.float32)
    _LIB.hq_i8_quantize(x.data_ptr(), codes.data_ptr(), steps.data_ptr(), rows, k)
    return codes, steps


class Int8Weights:
    """An int8 weight [N, K] and its bf16 per-channel scales [N], checked once, for
    `linear(x) = (per-row int8 x) @ W^T` in one compiled call."""

    def __init__(self, weight: Tensor, scales: Tensor):
        n, k = weight.shape
        if not i8_fits(k):
            raise QuantizationError(f"no compiled int8 kernel for in_features {k}")
        _need(weight, "int8 weight", torch.int8, (n, k))
        _need(scales, "int8 scales", torch.bfloat16, (n,))
        self.weight, self.scales, self.n, self.k = weight, scales, n, k
        self.wsums = weight.sum(dim=1, dtype=torch.int32)  # each row's, once, not at every call

    def linear(self, x: Tensor) -> Tensor:
        x = _activations(x, self.k)
        out = torch.empty(x.shape[0], self.n, dtype=torch.float32)
        if _LIB.hq_i8_linear(x.data_ptr(), self.weight.data_ptr(), self.scales.data_ptr(), self.wsums.data_ptr(),
                             out.data_ptr(), x.shape[0], self.n, self.k, torch.get_num_threads()):
            raise MemoryError("int8 kernel: no memory for its scratch buffers")
        return out


def tile_int4(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """Portable int4 (qweight uint8 [N, K/2]: column 2j low nibble, 2j+1 high; bf16 scales and
    zeros [N, K/group]) -> the compiled kernel's tiles, uint8 [ceil(N/16), K/group, 64 + 8 * group].

    A tile holds 16 output rows (the last one padded with zero weights). Per group: the 16 scales,
    the 16 zeros (bf16 bytes), then per block of 32 columns four chunks of 64 bytes; in chunk k,
    row i's four bytes are columns 8k + j (low nibble) and 8k + 4 + j (high), j = 0..3. The same
    bytes as the portable format, rearranged: 0.5 byte per weight plus 4 bytes per group."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    groups, per_group = k // group_size, group_size // BLOCK
    codes = torch.stack([qweight & 15, qweight >> 4], dim=-1).reshape(n, k)
    pad = -n % TILE
    if pad:
        codes = torch.cat([codes, torch.full((pad, k), 8, dtype=torch.uint8)])
        scales = torch.cat([scales, torch.zeros(pad, groups, dtype=scales.dtype)])
        zeros = torch.cat([zeros, torch.zeros(pad, groups, dtype=zeros.dtype)])
    count = (n + pad) // TILE
    # column within a block = 8 * chunk + 4 * nibble + j
    codes = codes.view(count, TILE, groups, per_group, 4, 2, 4).permute(0, 2, 3, 4, 1, 6, 5)
    weights = (codes[..., 0] | (codes[..., 1] << 4)).reshape(count, groups, per_group * 4 * 64)

    def per_tile(values: Tensor) -> Tensor:  # [N, groups] bf16 -> [count, groups, 32] bytes
        return values.reshape(count, TILE, groups).transpose(1, 2).contiguous().view(torch.uint8)

    return torch.cat([per_tile(scales), per_tile(zeros), weights], dim=2).contiguous()


def untile_int4(tiles: Tensor, n: int, k: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of `tile_int4`: the portable (qweight, scales, zeros) of the first n rows."""
    count, groups, per_group = tiles.shape[0], k // group_size, group_size // BLOCK

    def per_row(part: Tensor) -> Tensor:  # [count, groups, 32] bytes -> [n, groups] bf16
        return part.contiguous().view(torch.bfloat16).transpose(1, 2).reshape(count * TILE, groups)[:n]

    scales, zeros = per_row(tiles[..., :2 * TILE]), per_row(tiles[..., 2 * TILE:4 * TILE])
    weights = tiles[..., 4 * TILE:].reshape(count, groups, per_group, 4, TILE, 4)
    codes = torch.stack([weights & 15, weights >> 4], dim=-1)  # [count, g, b, chunk, row, j, nibble]
    codes = codes.permute(0, 4, 1, 2, 3, 6, 5).reshape(count * TILE, k)[:n]
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous(), scales.contiguous(), zeros.contiguous()


class Int4Weights:
    """int4 weights for `linear(x)`: x quantized to int8 per block of 32 values, int4 x int8
    products (shard/csrc/qmatmul.c says how, and why each row is exact alone). Built from the
    portable tensors (qweight uint8 [N, K/2], bf16 scales and zeros [N, K/group]), checked once;
    holds only the kernel's tiles (`tile_int4`), from which `portable()` rebuilds them."""

    def __init__(self, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int):
        n, k = qweight.shape[0], qweight.shape[1] * 2
        if not i4_fits(k, group_size):
            raise QuantizationError(
                f"no compiled int4 kernel for in_features {k}, group {group_size}")
        _need(qweight, "int4 qweight", torch.uint8, (n, k // 2))
        _need(scales, "int4 scales", torch.bfloat16, (n, k // group_size))
        _need(zeros, "int4 zeros", torch.bfloat16, (n, k // group_size))
        self.tiles = tile_int4(qweight, scales, zeros, group_size)
        self.n, self.k, self.group_size = n, k, group_size

    @classmethod
    def of_tiles(cls, tiles: Tensor, n: int, k: int, group_size: int) -> Int4Weights:
        """Adopt tiles `tile_int4` made (checked against n, k and the group)."""
        if not i4_fits(k, group_size):
            raise QuantizationError(
                f"no compiled int4 kernel for in_features {k}, group {group_size}")
        groups = k // group_size  # the C file's layout: hq_i4_tile_bytes per tile of 16 rows
        _need(tiles, "int4 tiles", torch.uint8, (-(-n // TILE), groups, _LIB.hq_i4_tile_bytes(k, group_size) // groups))
        weights = cls.__new__(cls)
        weights.tiles, weights.n, weights.k, weights.group_size = tiles, n, k, group_size
        return weights

    def portable(self) -> tuple[Tensor, Tensor, Tensor]:
        return untile_int4(self.tiles, self.n, self.k, self.group_size)

    def linear(self, x: Tensor) -> Tensor:
        x = _activations(x, self.k)
        out = torch.empty(x.shape[0], self.n, dtype=torch.float32)
        if _LIB.hq_i4_mm(x.data_ptr(), self.tiles.data_ptr(), out.data_ptr(), x.shape[0], self.n,
                         self.k, self.group_size, torch.get_num_threads()):
            raise MemoryError("int4 kernel: no memory for its scratch buffers")
        return out


def i4_mm(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """x fp32 [M, K] @ portable int4 weight^T -> fp32 [M, N] (see `Int4Weights`)."""
    return Int4Weights(qweight, scales, zeros, group_size).linear(x)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of fp32 rows x [..., n] with an fp32 weight [n], in one compiled call per tensor
    (torch's op costs ~50 us a call in a decode step, once the streamed weights have evicted it
    from the caches; this ~20). Each row is computed alone, in a fixed order."""
    n = weight.shape[0]
    if x.dtype != torch.float32 or x.shape[-1] != n or x.device.type != "cpu":
        raise QuantizationError(f"rms_norm of {x.dtype} {tuple(x.shape)} with a weight of {n}")
    _need(weight, "norm weight", torch.float32, (n,))
    x = x.contiguous()
    out = torch.empty_like(x)
    _LIB.hq_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // n, n, eps)
    return out


def attend(q: Tensor, keys: Tensor, values: Tensor, window: int | None) -> Tensor:
    """Causal attention of fp32 queries q [B, H, T, hd] (positions past .. past + T - 1, past =
    keys' length - T) over fp32 keys and values [B, KV, past + T, hd] (a cache's view: rows of hd
    contiguous), each query seeing its own position and those before it, within `window` if given;
    -> [B, T, H, hd]. Each query row is computed alone, in a fixed order (csrc/attention.c)."""
    B, H, T, hd = q.shape
    KV, length = keys.shape[1], keys.shape[2]
    for name, t in (("keys", keys), ("values", values)):
        if (t.dtype != torch.float32 or t.dim() != 4 or tuple(t.shape) != (B, KV, length, hd) or t.stride(3) != 1
                or t.stride(2) != hd or t.device.type != "cpu"):
            raise QuantizationError(f"{name} are {t.dtype} {tuple(t.shape)} strides {t.stride()}, expected "
                                    f"float32 [{B}, {KV}, {length}, {hd}] with rows of {hd} contiguous")
    if q.dtype != torch.float32 or q.device.type != "cpu" or KV == 0 or H % KV or length < T:
        raise QuantizationError(f"queries {q.dtype} {tuple(q.shape)} do not fit keys {tuple(keys.shape)}")
    q = q.contiguous()
    out = torch.empty((B, T, H, hd), dtype=torch.float32)
    failed = _LIB.ha_attend(q.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(), B, H, KV, T,
                            length - T, hd, keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
                            window or 0, hd**-0.5, torch.get_num_threads())
    if failed:
        raise MemoryError("attention: no memory for the scores of one row")
    return out


def rope_(qkv: Tensor, heads: int, head_dim: int, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding in place on the first `heads` heads of each row of fp32 qkv [B, T, width]
    (contiguous), cos and sin [T, head_dim] fp32: the bits of shard.rope.apply_rotary. Returns qkv."""
    B, T, width = qkv.shape
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dtype != torch.float32 or tuple(table.shape) != (T, head_dim) or not table.is_contiguous():
            raise QuantizationError(f"{name} is {table.dtype} {tuple(table.shape)}, expected float32 [{T}, {head_dim}]")
    if (qkv.dtype != torch.float32 or not qkv.is_contiguous() or qkv.device.type != "cpu" or head_dim % 2
            or heads * head_dim > width):
        raise QuantizationError(f"rotary embedding of {qkv.dtype} {tuple(qkv.shape)}: {heads} heads of {head_dim}")
    _LIB.hb_rope(qkv.data_ptr(), B * T, width, heads, head_dim, cos.data_ptr(), sin.data_ptr(), T)
    return qkv


def silu_mul(gate_up: Tensor) -> Tensor:
    """SwiGLU's middle: fp32 [..., 2 I] (gate then up) -> silu(gate) * up [..., I], element by element."""
    if gate_up.dtype != torch.float32 or gate_up.shape[-1] % 2 or gate_up.device.type != "cpu":
        raise QuantizationError(f"silu_mul of {gate_up.dtype} {tuple(gate_up.shape)}")
    gate_up = gate_up.contiguous()
    inner = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], inner, dtype=torch.float32)
    _LIB.hb_silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * inner), inner)
    return out
