"""Quantized linear layers (`Int8Linear` per output channel, `Int4Linear` in groups): the one seam
every quantized matmul goes through. Owns their portable saved format and the choice of the path
that runs them (shard/quant_swap.py puts them in place of `nn.Linear`s).

Portable format (what `state_dict()` holds, so a span saved with safetensors on one machine
loads on any other; no kernel-specific layout is ever saved):
- int8: `weight` int8 [out, in], `scales` bf16 [out]; w ~= weight * scales[:, None].
  Symmetric per output channel, codes in [-127, 127].
- int4: `qweight` uint8 [out, in/2] (column 2j in the low nibble, 2j+1 in the high one),
  `scales` and `zeros` bf16 [out, in/group]; w ~= (code - 8) * scale + zero per group.
  Asymmetric (min/max) per group: on random and heavy-tailed weights it gives 16-30% lower
  output error than symmetric int4.
- `bias` fp32 [out] when the layer has one.

Paths, fastest first (`path()` says which a layer runs; benchmarks/RESULTS.md has the figures):
- int8: "compiled" (shard/csrc/qmatmul.c through shard.qkernels: activations quantized to int8
  per row, exact int32 products) up to INT8_COMPILED_MAX_ROWS rows; "int_mm" (the same numbers
  through torch's `_int_mm`, faster for more rows); where torch lacks `_int_mm`, "packed" (torch's
  weight-only kernel, bf16 activations) up to INT8_KERNEL_MAX_ROWS rows and "dequant" (fp32
  `F.linear` on chunks of dequantized rows) beyond.
- int4: "compiled" (int4 x int8 on the portable tensors, activations quantized to int8 per block
  of 32) at every row count; else "packed" (torch's `_weight_int4pack_mm_for_cpu`, bf16
  activations; the weights then live only in its layout and `state_dict()` rebuilds the portable
  ones); else "dequant".
Every path treats rows independently, and a row's result does not depend on the row count
except across int8's packed/dequant switch at INT8_KERNEL_MAX_ROWS (where torch lacks `_int_mm`;
shard.batch groups rows around it). Batching and failover replay rely on this
(tests/shard/test_quant.py checks each path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shard import huge_pages, qkernels
from shard.compute import return_free_memory
from shard.errors import QuantizationError

QUANT_MODES = ("none", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
INT8_KERNEL_MAX_ROWS = 48  # most rows (tokens x sequences) for int8's packed bf16 kernel
# Largest number of rows for which int8 x int8 runs the compiled kernel rather than torch's
# `_int_mm` (same int32 products either way; see benchmarks/RESULTS.md for the crossover).
INT8_COMPILED_MAX_ROWS = 8
_DEQUANT_CHUNK_ELEMS = 1 << 20  # weights dequantized at a time by the fallback path (4 MiB of fp32)
# Smallest scale, so that a constant row or group does not divide by zero.
_MIN_SCALE = 1e-20

_INT8_MM = "_weight_int8pack_mm"
_INT8_INT8_MM = "_int_mm"  # int8 x int8 -> int32
_INT4_MM = "_weight_int4pack_mm_for_cpu"
_INT4_CONVERT = "_convert_weight_to_int4pack_for_cpu"
# innerKTiles of the int4 packing: the CPU op gives the same bytes for 1, 2, 4 and 8.
_INT4_INNER_K_TILES = 2


def _has_aten_op(name: str) -> bool:
    """Whether this torch has `torch.ops.aten.<name>` (tests patch this to force the fallback)."""
    return hasattr(torch.ops.aten, name)


def _has_compiled() -> bool:
    """Whether shard/_qkernels loaded (tests patch this to force torch's paths)."""
    return qkernels.available()


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise QuantizationError(f"{name} must be a positive int, got {value!r}")


def _check_group_size(group_size: int, in_features: int) -> None:
    if type(group_size) is not int or group_size not in INT4_GROUP_SIZES:
        raise QuantizationError(
            f"int4 group_size {group_size!r} is not one of {INT4_GROUP_SIZES}"
        )
    if in_features % group_size:
        raise QuantizationError(
            f"int4 group_size {group_size} does not divide in_features {in_features}"
        )


def _check_weight(weight: Tensor, bias: Tensor | None) -> None:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise QuantizationError(
            f"expected a float weight [out, in], got {weight.dtype} {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise QuantizationError(
            f"bias shape {tuple(bias.shape)} does not match out_features {weight.shape[0]}"
        )


def _check_saved(state_dict: dict, prefix: str, expected: dict[str, tuple]) -> None:
    """Refuse saved tensors whose shape or dtype differs from `expected[name] = (shape, dtype)`."""
    for name, (shape, dtype) in expected.items():
        tensor = state_dict.get(prefix + name)
        if tensor is None:
            continue
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise QuantizationError(
                f"saved tensor {prefix + name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"expected {dtype} {shape}"
            )


def _rows_per_chunk(in_features: int) -> int:
    return max(1, _DEQUANT_CHUNK_ELEMS // in_features)


def _bias_or_none(bias: bool, out_features: int, device) -> Tensor | None:
    return torch.zeros(out_features, device=device) if bias else None


# --- int8 -------------------------------------------------------------------------------


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: returns (codes int8 [out, in], scales bf16 [out])."""
    w = weight.detach().float()  # [out, in]
    scales = (w.abs().amax(dim=1) / 127).clamp(min=_MIN_SCALE).to(torch.bfloat16)  # [out]
    codes = (w / scales.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return codes, scales


def int8_dequant_matmul(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """Fallback x @ W^T for int8 W: fp32 GEMM on chunks of dequantized rows, then scale."""
    # x: [M, in] fp32, weight: [out, in] int8, scales: [out] -> [M, out] fp32
    rows = _rows_per_chunk(weight.shape[1])
    parts = [F.linear(x, weight[r : r + rows].float()) for r in range(0, weight.shape[0], rows)]
    return torch.cat(parts, dim=-1) * scales.float()


def int8_w8a8_matmul(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """x [M, in] fp32 @ (int8 weight [out, in] x per-channel scales)^T, with each row of x quantized
    to int8 by its own absmax (llama.cpp's Q8_0 does so per 32 values) and an exact int32 product.
    Rows never mix, so a batch gives each row exactly what it gets alone, at any row count.

    Measured (benchmarks/bench_int8_paths.py): 1.4x the decode and 5.8x the prefill speed of the
    packed weight-only kernel; demo-model perplexity +0.05% vs fp32 (+0.02% weight-only)."""
    step = x.abs().amax(dim=1, keepdim=True).clamp_min(_MIN_SCALE) / 127.0  # [M, 1]
    codes = torch.round(x / step).to(torch.int8)  # [M, in], |codes| <= 127
    return torch._int_mm(codes, weight.t()).float() * step * scales.float()  # [M, out]


def prepare_kernels_(module: nn.Module) -> None:
    """Build the compiled view of each quantized linear inside `module` whose weights fill a huge
    page or more, now rather than at its first forward: its weights move to huge pages
    (`shard.huge_pages`) while a loader runs, and the pages they leave go back to the system
    (`shard.compute.return_free_memory`) before the next layer moves. Smaller layers, and every
    layer where THP is off, get their views at the first forward as before."""
    if not huge_pages.supported():
        return  # nothing would move: the views are built at the first forward, as before
    for layer in module.modules():
        if isinstance(layer, Int8Linear):
            weight = layer._buffers["weight"]
        elif isinstance(layer, Int4Linear):
            weight = layer._buffers["kernel_tiles"]
        else:
            continue
        if weight is not None and weight.nbytes >= huge_pages.HUGE_PAGE:
            layer.compiled()
            return_free_memory()  # the old copy's pages, before the next layer's move


class Int8Linear(nn.Module):
    """Linear layer with int8 weights, symmetric per output channel; fp32 in, fp32 out.

    Runs int8 x int8 with per-row activation scales where torch has `_int_mm` (every current
    x86/ARM CPU build); else torch's packed weight-only kernel for up to INT8_KERNEL_MAX_ROWS rows
    and a dequantizing GEMM beyond."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        _check_positive("in_features", in_features)
        _check_positive("out_features", out_features)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "scales", torch.ones(out_features, dtype=torch.bfloat16, device=device)
        )
        self.register_buffer("bias", _bias_or_none(bias, out_features, device))

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None) -> Int8Linear:
        _check_weight(weight, bias)
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias is not None, device="meta")
        layer.weight, layer.scales = quantize_int8(weight)
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer

    def uses_kernel(self, rows: int) -> bool:
        """Whether a forward over `rows` rows runs the packed kernel (else the fallback)."""
        return (
            1 <= rows <= INT8_KERNEL_MAX_ROWS
            and self.in_features % 16 == 0
            and self.weight.data_ptr() % 64 == 0  # the kernel segfaults on weights not 64-byte aligned
            and _has_aten_op(_INT8_MM)
        )

    def compiled(self) -> qkernels.Int8Weights | None:
        """The compiled kernel's view of this layer's weights, or None where it does not run
        (checked once per pair of tensors; see Int4Linear.compiled)."""
        if not _has_compiled():
            return None
        weight, scales = self._buffers["weight"], self._buffers["scales"]
        cached = self.__dict__.get("_compiled")
        if cached is not None and cached.weight is weight and cached.scales is scales:
            return cached
        if not qkernels.i8_fits(self.in_features):
            return None
        weight = self._buffers["weight"] = huge_pages.copy(weight)  # streamed at every step: 2 MiB pages
        self._compiled = qkernels.Int8Weights(weight, scales)
        return self._compiled

    def uses_int8_activations(self) -> bool:
        """Whether forwards run int8 x int8 (`int8_w8a8_matmul`): any row count, where torch has it."""
        return self.in_features % 8 == 0 and _has_aten_op(_INT8_INT8_MM)

    def path(self, rows: int) -> str:
        """Which path a forward over `rows` rows runs: "compiled" (shard/csrc), "int_mm" (torch's
        int8 x int8: the same numbers), "packed" (torch's weight-only kernel) or "dequant"."""
        if rows <= INT8_COMPILED_MAX_ROWS and self.compiled() is not None:
            return "compiled"
        if self.uses_int8_activations():
            return "int_mm"
        return "packed" if self.uses_kernel(rows) else "dequant"

    def forward(self, x: Tensor) -> Tensor:
        # x: [..., in] -> [..., out]
        x2 = x.reshape(-1, self.in_features).float()  # [M, in]
        path = self.path(x2.shape[0])
        if path == "compiled":  # the same numbers as int8_w8a8_matmul, in one call
            y = self.compiled().linear(x2)  # [M, out]
        elif path == "int_mm":
            y = int8_w8a8_matmul(x2, self.weight, self.scales)  # [M, out]
        elif path == "packed":
            mm = getattr(torch.ops.aten, _INT8_MM)
            y = mm(x2.to(torch.bfloat16), self.weight, self.scales).float()  # [M, out]
        else:
            y = int8_dequant_matmul(x2, self.weight, self.scales)  # [M, out]
        bias = self._buffers["bias"]
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        expected = {
            "weight": ((self.out_features, self.in_features), torch.int8),
            "scales": ((self.out_features,), torch.bfloat16),
        }
        if self.bias is not None:
            expected["bias"] = ((self.out_features,), torch.float32)
        _check_saved(state_dict, prefix, expected)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


# --- int4 -------------------------------------------------------------------------------


def pack_nibbles(codes: Tensor) -> Tensor:
    """Codes uint8 [out, in] in 0..15 -> uint8 [out, in/2]: column 2j low nibble, 2j+1 high."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of `pack_nibbles`: uint8 [out, in/2] -> codes uint8 [out, in]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def quantize_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric int4 per group: (qweight uint8 [out, in/2], scales, zeros bf16 [out, in/g]).

    Each group's [min, max] maps onto codes 0..15; w ~= (code - 8) * scale + zero.
    """
    out_features, in_features = weight.shape
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)  # [out, in/g]
    scales = ((high - low) / 15).clamp(min=_MIN_SCALE).to(torch.bfloat16)
    zeros = (low + 8 * scales.float()).to(torch.bfloat16)
    # Codes from the rounded (stored) parameters, so they are optimal for what is saved.
    codes = (w - zeros.float()[..., None]) / scales.float()[..., None]
    codes = codes.round_().add_(8).clamp_(0, 15).to(torch.uint8)  # [out, in/g, g]
    return pack_nibbles(codes.reshape(out_features, in_features)), scales, zeros


def int4_dequantize(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """Portable int4 -> fp32 weight [out, in]."""
    out_features = qweight.shape[0]
    codes = unpack_nibbles(qweight).reshape(out_features, -1, group_size).float()
    scale = scales.float()[..., None]  # [out, in/g, 1]
    w = torch.addcmul(zeros.float()[..., None] - 8 * scale, codes, scale)  # code * s + (z - 8s)
    return w.reshape(out_features, -1)  # [out, in]


def int4_dequant_matmul(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int
) -> Tensor:
    """Fallback x @ W^T for portable int4 W: fp32 GEMM on chunks of dequantized rows."""
    # x: [M, in] fp32 -> [M, out] fp32
    rows = _rows_per_chunk(x.shape[-1])
    parts = [
        F.linear(x, int4_dequantize(qweight[r : r + rows], scales[r : r + rows],
                                    zeros[r : r + rows], group_size))
        for r in range(0, qweight.shape[0], rows)
    ]
    return torch.cat(parts, dim=-1)


def cpu_int4_layout(codes: Tensor) -> Tensor:
    """Our model of `_convert_weight_to_int4pack_for_cpu` (AVX-512 build): codes [N, K] -> [N, K/2].

    Rows come in blocks of 64, each stored as [K, 32] bytes (row j low nibble, row 32+j high);
    the last N % 64 rows as [K, t/2] bytes (row 2j low, 2j+1 high). Checked against the op on
    every tensor it packs (`Int4Linear._adopt`), so a different build only costs memory.
    """
    n_rows, k = codes.shape
    head = n_rows // 64 * 64
    parts = []
    if head:
        blocks = codes[:head].reshape(head // 64, 2, 32, k).permute(0, 3, 1, 2)  # [nb, K, 2, 32]
        parts.append((blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(-1))
    if n_rows > head:
        tail = codes[head:].reshape((n_rows - head) // 2, 2, k).permute(2, 1, 0)  # [K, 2, t/2]
        parts.append((tail[:, 0] | (tail[:, 1] << 4)).reshape(-1))
    return torch.cat(parts).reshape(n_rows, k // 2)


def cpu_int4_codes(packed: Tensor, n_rows: int, k: int) -> Tensor:
    """Inverse of `cpu_int4_layout`: kernel-packed uint8 -> codes uint8 [N, K]."""
    flat = packed.reshape(-1)
    head = n_rows // 64 * 64
    parts = []
    if head:
        blocks = flat[: head * k // 2].reshape(head // 64, k, 32)
        codes = torch.stack([blocks & 15, blocks >> 4], dim=2)  # [nb, K, 2, 32]
        parts.append(codes.permute(0, 2, 3, 1).reshape(head, k))
    if n_rows > head:
        tail = flat[head * k // 2 :].reshape(k, (n_rows - head) // 2)
        codes = torch.stack([tail & 15, tail >> 4], dim=1)  # [K, 2, t/2]
        parts.append(codes.permute(2, 1, 0).reshape(n_rows - head, k))
    return torch.cat(parts)


class Int4Linear(nn.Module):
    """Linear layer with int4 weights, asymmetric per group along `in`; fp32 in, fp32 out.

    The weights live in the layout of the kernel that runs, so int4 costs 0.5 byte per weight:
    the compiled kernel's tiles (`kernel_tiles`), else torch's CPU int4 kernel's layout
    (`kernel_weight`, `kernel_scale_zeros`); both are non-persistent buffers, and `state_dict()`
    rebuilds the portable tensors from them. Otherwise the portable buffers `qweight`, `scales`,
    `zeros` are used by the dequantizing fallback.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, group_size: int = 32,
        device=None,
    ):
        super().__init__()
        _check_positive("in_features", in_features)
        _check_positive("out_features", out_features)
        _check_group_size(group_size, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size
        groups = in_features // group_size
        # An empty layer holds zero weights: every code is 8 and every zero 0.
        self.register_buffer("qweight", torch.full(
            (out_features, in_features // 2), 0x88, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(
            out_features, groups, dtype=torch.bfloat16, device=device))
        self.register_buffer("zeros", torch.zeros(
            out_features, groups, dtype=torch.bfloat16, device=device))
        self.register_buffer("bias", _bias_or_none(bias, out_features, device))
        self.register_buffer("kernel_weight", None, persistent=False)
        self.register_buffer("kernel_scale_zeros", None, persistent=False)
        self.register_buffer("kernel_tiles", None, persistent=False)

    @classmethod
    def from_float(
        cls, weight: Tensor, bias: Tensor | None = None, group_size: int = 32
    ) -> Int4Linear:
        _check_weight(weight, bias)
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias is not None, group_size, device="meta")
        layer._adopt(*quantize_int4(weight, group_size))
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer

    def uses_compiled(self) -> bool:
        """Whether forwards run the compiled int4 x int8 kernel."""
        return _has_compiled() and qkernels.i4_fits(self.in_features, self.group_size)

    def compiled(self) -> qkernels.Int4Weights | None:
        """The compiled kernel's weights (its tiles), or None where it does not run. Tiles made
        before the kernels went away (tests switch them off) are left to `portable()`. This runs at
        every forward: buffers read from `_buffers`, not nn.Module's slower attribute lookup."""
        tiles = self._buffers["kernel_tiles"]
        if tiles is None or not _has_compiled():
            return None
        cached = self.__dict__.get("_compiled")
        if cached is None or cached.tiles is not tiles:
            tiles = self._buffers["kernel_tiles"] = huge_pages.copy(tiles)  # streamed at every step: 2 MiB pages
            cached = self._compiled = qkernels.Int4Weights.of_tiles(
                tiles, self.out_features, self.in_features, self.group_size)
        return cached

    def kernel_fits(self) -> bool:
        """Whether this torch has the CPU int4 kernel and this layer's shape suits it."""
        return (
            not self.uses_compiled()
            and self.out_features % 16 == 0
            and _has_aten_op(_INT4_MM)
            and _has_aten_op(_INT4_CONVERT)
        )

    def _adopt(self, qweight: Tensor, scales: Tensor, zeros: Tensor) -> None:
        """Take portable tensors; keep them in the layout of the kernel that fits, if any."""
        self.qweight, self.scales, self.zeros = (
            qweight.contiguous(), scales.contiguous(), zeros.contiguous())
        self.kernel_weight = self.kernel_scale_zeros = self.kernel_tiles = None
        if self.uses_compiled():
            self.kernel_tiles = qkernels.tile_int4(self.qweight, self.scales, self.zeros, self.group_size)
            self.qweight = self.scales = self.zeros = None  # state_dict() rebuilds them
            return
        if not self.kernel_fits():
            return
        codes = unpack_nibbles(qweight)  # [out, in]
        convert = getattr(torch.ops.aten, _INT4_CONVERT)
        self.kernel_weight = convert(codes.int(), _INT4_INNER_K_TILES)
        # [in/g, out, 2]: (scale, zero) per group and output channel, as the kernel reads them.
        self.kernel_scale_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).contiguous()
        if torch.equal(self.kernel_weight, cpu_int4_layout(codes)):
            self.qweight = self.scales = self.zeros = None  # state_dict() rebuilds them

    def portable(self) -> tuple[Tensor, Tensor, Tensor]:
        """(qweight, scales, zeros) in the portable format, rebuilt from a kernel's if dropped."""
        if self.qweight is not None:
            return self.qweight, self.scales, self.zeros
        if self.kernel_tiles is not None:
            return qkernels.untile_int4(
                self.kernel_tiles, self.out_features, self.in_features, self.group_size)
        codes = cpu_int4_codes(self.kernel_weight, self.out_features, self.in_features)
        scale_zeros = self.kernel_scale_zeros
        return (
            pack_nibbles(codes),
            scale_zeros[..., 0].t().contiguous(),
            scale_zeros[..., 1].t().contiguous(),
        )

    def path(self, rows: int = 1) -> str:
        """Which path forwards run (at any row count): "compiled" (shard/csrc, int4 x int8),
        "packed" (torch's int4 kernel, bf16 activations) or "dequant"."""
        if self.compiled() is not None:
            return "compiled"
        return "packed" if self.kernel_weight is not None else "dequant"

    def forward(self, x: Tensor) -> Tensor:
        # x: [..., in] -> [..., out]
        x2 = x.reshape(-1, self.in_features).float()  # [M, in]
        compiled = self.compiled()
        if compiled is not None:
            y = compiled.linear(x2)  # [M, out]
        elif self.kernel_weight is not None:
            mm = getattr(torch.ops.aten, _INT4_MM)
            y = mm(x2.to(torch.bfloat16), self.kernel_weight, self.group_size,
                   self.kernel_scale_zeros).float()  # [M, out]
        else:
            y = int4_dequant_matmul(x2, *self.portable(), self.group_size)  # [M, out]
        bias = self._buffers["bias"]
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _saved_layout(self) -> dict[str, tuple]:
        groups = self.in_features // self.group_size
        layout = {
            "qweight": ((self.out_features, self.in_features // 2), torch.uint8),
            "scales": ((self.out_features, groups), torch.bfloat16),
            "zeros": ((self.out_features, groups), torch.bfloat16),
        }
        if self.bias is not None:
            layout["bias"] = ((self.out_features,), torch.float32)
        return layout

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        qweight, scales, zeros = self.portable()
        destination[prefix + "qweight"] = qweight
        destination[prefix + "scales"] = scales
        destination[prefix + "zeros"] = zeros
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ):
        layout = self._saved_layout()
        _check_saved(state_dict, prefix, layout)
        if strict:
            unexpected_keys.extend(
                key for key in state_dict
                if key.startswith(prefix) and key[len(prefix):] not in layout
            )
        missing = [prefix + name for name in layout if prefix + name not in state_dict]
        missing_keys.extend(missing)
        if missing:
            return
        if self.bias is not None:
            self.bias = state_dict[prefix + "bias"]
        self._adopt(*(state_dict[prefix + name] for name in ("qweight", "scales", "zeros")))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}"
        )
