"""A span's decode step in one compiled call (shard/csrc/block_step.c).

A decode step of issue 16's model spent about 5 ms a token outside its quantized matmuls: Python
and torch dispatch between a dozen calls per block, each running with cold caches after the
weights streamed through them. `step` runs the same compiled kernels in the same order as the
modules of shard/blocks.py, on the same values, in one call for all the span's blocks, so its
outputs and the cache entries it writes have exactly the module path's bits (batching, chunked
replay and spot checks compare bits: tests/shard/test_block_step.py holds the two paths equal).

`run` takes the steps of several sessions at once (`Segment`s), as a node's batched pass does
(`shard.batch`): at each block the rows of every session that runs it share one read of the
weights, while rotary embedding, the cache write and attention stay per session. Measured on issue
16's model, 8 blocks, 4 decoding sessions a pass: 1.11-1.28x the speed of the modules' pass
(benchmarks/bench_batch_pass.py).

It runs where every block's four linears take the compiled int8 or int4 kernels at the pass's row
count (`MAX_ROWS`), everything is fp32 and autograd is off; `SpanModel.forward` and
`shard.batch.forward_batch` fall back to the modules otherwise. Each block's weights are checked
once (`weights_of`) and kept with it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from shard import qkernels
from shard.errors import QuantizationError
from shard.kv_cache import KVCache
from shard.quant import INT8_COMPILED_MAX_ROWS, Int4Linear, Int8Linear

MAX_ROWS = INT8_COMPILED_MAX_ROWS  # rows (sequences x tokens) up to which every linear is compiled

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_INT8, _INT4 = 1, 2  # hb_linear.kind


class _Linear(ctypes.Structure):
    _fields_ = [("kind", _i64), ("n", _i64), ("k", _i64), ("group", _i64), ("weight", _ptr),
                ("scales", _ptr), ("wsums", _ptr), ("bias", _ptr)]


class _Block(ctypes.Structure):
    _fields_ = [("norm1", _ptr), ("norm2", _ptr), ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear),
                ("down", _Linear)]


class _Shape(ctypes.Structure):
    _fields_ = [(name, _i64) for name in ("D", "heads", "kv_heads", "hd", "window")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float)]


class _Segment(ctypes.Structure):
    _fields_ = [(name, _i64) for name in ("B", "T", "past", "first", "last")] + [
        ("cos", _ptr), ("sin", _ptr), ("keys", _ptr), ("values", _ptr), ("layer_stride", _i64),
        ("batch_stride", _i64), ("head_stride", _i64)]


_LIB = qkernels._LIB
if _LIB is not None:
    _LIB.hb_blocks_run.argtypes = [_ptr, _i64, _ptr, ctypes.POINTER(_Shape), ctypes.POINTER(_Segment), _i64,
                                   ctypes.c_int]
    _LIB.hb_blocks_run.restype = ctypes.c_int


@dataclass(frozen=True)
class Segment:
    """One session's part of a `run`: its input, its cache and the blocks of the chain it runs."""

    hidden: Tensor  # fp32 [B, T, D]
    cache: KVCache  # layers = last - first
    cos: Tensor  # fp32 [T, head_dim], positions cache.length .. + T - 1
    sin: Tensor
    first: int = 0  # the first block of the chain it runs
    last: int | None = None  # one past its last (None: to the chain's end)


def _linear(layer: torch.nn.Module) -> tuple[_Linear, tuple[Tensor, ...]] | None:
    """The C view of a quantized linear whose compiled kernel runs at MAX_ROWS rows, and the
    tensors it points into; None for any other layer."""
    bias = layer._buffers.get("bias")
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return None
    bias_ptr = bias.data_ptr() if bias is not None else None
    if isinstance(layer, Int8Linear) and layer.path(MAX_ROWS) == "compiled":
        w = layer.compiled()
        return (_Linear(_INT8, w.n, w.k, 0, w.weight.data_ptr(), w.scales.data_ptr(), w.wsums.data_ptr(), bias_ptr),
                (w.weight, w.scales, w.wsums, bias))
    if isinstance(layer, Int4Linear) and layer.path(MAX_ROWS) == "compiled":
        w = layer.compiled()
        return _Linear(_INT4, w.n, w.k, w.group_size, w.tiles.data_ptr(), None, None, bias_ptr), (w.tiles, bias)
    return None


class BlockWeights:
    """One decoder block as hb_blocks_run reads it, and the tensors its pointers lead into (held,
    so they stay valid while this lives)."""

    def __init__(self, block: torch.nn.Module):
        self.key = self._key(block)
        norms = (block.input_layernorm.weight, block.post_attention_layernorm.weight)
        self.eps = block.input_layernorm.eps
        parts = [_linear(layer) for layer in (block.self_attn.qkv_proj, block.self_attn.o_proj,
                                              block.mlp.gate_up_proj, block.mlp.down_proj)]
        self.usable = (all(part is not None for part in parts) and block.post_attention_layernorm.eps == self.eps
                       and all(n.dtype == torch.float32 and n.dim() == 1 and n.is_contiguous() for n in norms))
        if not self.usable:
            return
        self.held = (norms, [held for _, held in parts])
        self.width = norms[0].shape[0]
        self.shape = tuple((view.n, view.k) for view, _ in parts)
        self.struct = _Block(norms[0].data_ptr(), norms[1].data_ptr(), *(view for view, _ in parts))

    @staticmethod
    def _key(block: torch.nn.Module) -> tuple:
        """What the struct was built from: a block whose layers or kernels change is rebuilt. (Read
        through the modules' dicts: nn.Module's attribute lookup would cost more than the check.)"""
        attn, mlp = block._modules["self_attn"]._modules, block._modules["mlp"]._modules
        layers = (attn["qkv_proj"], attn["o_proj"], mlp["gate_up_proj"], mlp["down_proj"])
        return (block._modules["input_layernorm"]._parameters["weight"],
                block._modules["post_attention_layernorm"]._parameters["weight"],
                *(layer.compiled() if isinstance(layer, (Int8Linear, Int4Linear)) else layer for layer in layers))

    def current(self, block: torch.nn.Module) -> bool:
        key = self._key(block)
        return len(key) == len(self.key) and all(a is b for a, b in zip(key, self.key))


def weights_of(block: torch.nn.Module) -> BlockWeights | None:
    """`block`'s `BlockWeights`, built at its first step and kept on it; None where the compiled
    step cannot run it (kernels not loaded, a float or bf16 layer, a bias of another dtype)."""
    if not qkernels.available():
        return None
    cached = block.__dict__.get("_step_weights")
    if cached is None or not cached.current(block):
        cached = block.__dict__["_step_weights"] = BlockWeights(block)
    return cached if cached.usable else None


def step(weights: Sequence[BlockWeights], hidden: Tensor, cache: KVCache, cos: Tensor, sin: Tensor, *,
         heads: int, kv_heads: int, head_dim: int, window: int | None) -> Tensor:
    """hidden fp32 [B, T, D] through the blocks `weights` (cache layers 0..len-1), writing the
    step's keys and values at positions cache.length .. + T - 1 (the caller advances the cache)."""
    return run(weights, [Segment(hidden, cache, cos, sin)], heads=heads, kv_heads=kv_heads, head_dim=head_dim,
               window=window)[0]


def run(weights: Sequence[BlockWeights], segments: Sequence[Segment], *, heads: int, kv_heads: int,
        head_dim: int, window: int | None) -> list[Tensor]:
    """Each segment's output [B, T, D] after the blocks it runs, all in one call: each block's
    weights are read once for the rows of every segment that runs it (`shard.batch`). Each writes its
    keys and values at positions cache.length .. + T - 1 (the caller advances the caches)."""
    if not weights or not segments:
        raise QuantizationError(f"compiled step of {len(segments)} segments over {len(weights)} blocks")
    D = weights[0].width  # each segment's hidden states are checked against it
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    for block in weights:
        (qkv_n, qkv_k), (o_n, o_k), (gu_n, gu_k), (down_n, down_k) = block.shape
        if (qkv_n, qkv_k, o_n, o_k, gu_k, down_n) != (q_size + 2 * kv_size, D, D, q_size, D, D) or (
                gu_n != 2 * down_k) or block.eps != weights[0].eps or block.width != D:
            raise QuantizationError(f"a block of shapes {block.shape} does not fit a step of width {D} with "
                                    f"{heads} heads and {kv_heads} kv heads of {head_dim}")
    specs = (_Segment * len(segments))()
    for spec, segment in zip(specs, segments):
        _describe(spec, segment, len(weights), D, kv_heads, head_dim)
    if sum(spec.B * spec.T for spec in specs) > MAX_ROWS:
        raise QuantizationError(f"compiled step of {sum(spec.B * spec.T for spec in specs)} rows, "
                                f"at most {MAX_ROWS}")
    x = torch.cat([segment.hidden.reshape(-1, D) for segment in segments])  # a copy: the step works in place
    shape = _Shape(D, heads, kv_heads, head_dim, window or 0, weights[0].eps, head_dim**-0.5)
    blocks = (_ptr * len(weights))(*(ctypes.addressof(block.struct) for block in weights))
    if _LIB.hb_blocks_run(blocks, len(weights), x.data_ptr(), ctypes.byref(shape), specs, len(segments),
                          torch.get_num_threads()):
        raise MemoryError("compiled step: no memory for its scratch buffers")
    outputs, at = [], 0
    for segment in segments:
        rows = segment.hidden.shape[0] * segment.hidden.shape[1]
        outputs.append(x[at:at + rows].view(segment.hidden.shape))
        at += rows
    return outputs


def _describe(spec: _Segment, segment: Segment, count: int, D: int, kv_heads: int, head_dim: int) -> None:
    """Fill `spec` from `segment`, after checking everything the C code takes on trust."""
    hidden, cache = segment.hidden, segment.cache
    keys, values = cache.keys, cache.values
    last = count if segment.last is None else segment.last
    if hidden.dim() != 3:
        raise QuantizationError(f"compiled step of hidden states {tuple(hidden.shape)}, expected [B, T, {D}]")
    B, T, width = hidden.shape
    if (hidden.dtype != torch.float32 or width != D or keys.dtype != torch.float32
            or values.dtype != torch.float32 or not keys.is_contiguous() or not values.is_contiguous()
            or keys.shape != values.shape or not 0 <= segment.first < last <= count
            or tuple(keys.shape[:3]) != (last - segment.first, B, kv_heads) or keys.shape[4] != head_dim
            or cache.length + T > keys.shape[3] or B * T > MAX_ROWS):
        raise QuantizationError(f"compiled step of {hidden.dtype} {tuple(hidden.shape)} over a cache of "
                                f"{keys.dtype} {tuple(keys.shape)} at length {cache.length}, through "
                                f"blocks [{segment.first}, {last}) of {count}")
    for table in (segment.cos, segment.sin):
        if table.dtype != torch.float32 or tuple(table.shape) != (T, head_dim) or not table.is_contiguous():
            raise QuantizationError(f"rotary table {table.dtype} {tuple(table.shape)}, expected float32 [{T}, {head_dim}]")
    strides = keys.stride()
    spec.B, spec.T, spec.past, spec.first, spec.last = B, T, cache.length, segment.first, last
    spec.cos, spec.sin = segment.cos.data_ptr(), segment.sin.data_ptr()
    spec.keys, spec.values = keys.data_ptr(), values.data_ptr()
    spec.layer_stride, spec.batch_stride, spec.head_stride = strides[0], strides[1], strides[2]
