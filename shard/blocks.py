"""Llama-family decoder blocks: RMSNorm, grouped-query attention over a KV cache, SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shard import qkernels
from shard.config import ModelConfig
from shard.interfaces import ROW_EXACT_TOKENS
from shard.kv_cache import KVCache
from shard.rope import apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, D]; normalised in fp32 whatever the compute dtype, like the reference
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if qkernels.available() and not torch.is_grad_enabled():
                return qkernels.rms_norm(x, self.weight, self.eps)  # one compiled pass per row
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # the formula below, one op
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    """q, k and v projections fused into one matmul (`qkv_proj`): one read of the weights' rows."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        qkv_bias = config.attention_bias or config.qkv_bias
        self.qkv_proj = nn.Linear(config.hidden_size, config.q_size + 2 * config.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=config.attention_bias)
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.split = (config.q_size, config.kv_size, config.kv_size)
        self.sliding_window = config.sliding_window

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache, layer: int, mask: torch.Tensor | None) -> torch.Tensor:
        # x: [B, T, D]
        B, T, _ = x.shape
        return self.o_proj(self.attend(self.qkv_proj(x).view(B, T, -1), cos, sin, cache, layer, mask))

    def attend(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               cache: KVCache, layer: int, mask: torch.Tensor | None) -> torch.Tensor:
        """qkv [B, T, q + 2 kv] -> attention output [B, T, H * hd], this step's keys and values
        written to `cache`. The one attention code a span and a batched pass (shard.batch) run."""
        B, T, _ = qkv.shape
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        rotated = (heads + kv_heads) * head_dim  # q and k, rotated at once: [B, T, H + KV, hd]
        if compiled_ops(qkv) and cos.dim() == 2:  # the same bits in one call, in place
            qkv = qkernels.rope_(qkv.contiguous(), heads + kv_heads, head_dim, cos, sin)
            qk = qkv[..., :rotated].view(B, T, heads + kv_heads, head_dim)
        else:
            qk = apply_rotary(qkv[..., :rotated].view(B, T, heads + kv_heads, head_dim),
                              cos.unsqueeze(-2), sin.unsqueeze(-2))
        q = qk[:, :, :heads].transpose(1, 2)  # [B, H, T, hd]
        k = qk[:, :, heads:].transpose(1, 2)  # [B, KV, T, hd]
        v = qkv[..., rotated:].view(B, T, kv_heads, head_dim).transpose(1, 2)
        keys, values = cache.update(layer, k.to(cache.keys.dtype), v.to(cache.values.dtype))  # [B, KV, L, hd]
        if compiled_attention(q, keys):  # each row alone, whatever the step's length: chunk-invariant
            return qkernels.attend(q, keys, values, self.sliding_window).view(B, T, heads * head_dim)
        out = _attention(q, keys.to(q.dtype), values.to(q.dtype), mask)  # [B, H, T, hd]
        return out.transpose(1, 2).reshape(B, T, heads * head_dim)


def compiled_ops(x: torch.Tensor) -> bool:
    """Whether the compiled element-wise steps (rotary embedding, SwiGLU) run on x: fp32, no autograd."""
    return x.dtype == torch.float32 and qkernels.available() and not torch.is_grad_enabled()


def compiled_attention(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether attention runs the compiled kernel (`shard.qkernels.attend`): fp32, no autograd.
    Then every position's output has the same bits however the positions were split into steps."""
    return (q.dtype == torch.float32 and keys.dtype == torch.float32 and qkernels.available()
            and not torch.is_grad_enabled())


def _attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention with grouped kv heads: q [B, H, T, hd], keys and values
    [B, KV, L, hd] -> [B, H, T, hd]. A decode step (one query, no mask) runs as two batched
    matmuls and a softmax: torch's fused kernel costs several times more for a single query. A
    short step (`ROW_EXACT_TOKENS`) runs each query as that decode step would, over its own keys."""
    B, H, T, hd = q.shape
    kv_heads = keys.shape[1]
    if 1 < T <= ROW_EXACT_TOKENS:
        past = keys.shape[2] - T
        return torch.cat([_attention(q[:, :, i : i + 1], keys[:, :, : past + i + 1], values[:, :, : past + i + 1],
                                     _row_mask(mask, i, past)) for i in range(T)], dim=2)
    if T == 1 and mask is None:
        grouped = q.reshape(B, kv_heads, H // kv_heads, hd)  # the query heads that share a kv head
        scores = torch.matmul(grouped, keys.transpose(-1, -2)).mul_(hd**-0.5)  # [B, KV, H/KV, L]
        return torch.matmul(scores.softmax(dim=-1), values).view(B, H, 1, hd)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=kv_heads != H)


def _row_mask(mask: torch.Tensor | None, row: int, past: int) -> torch.Tensor | None:
    """Query `row`'s part of a step's mask, as `attention_mask` makes it for that query alone: None
    where it sees every key up to its own position."""
    if mask is None:
        return None
    seen = mask[row : row + 1, : past + row + 1]
    return None if bool(seen.all()) else seen


class MLP(nn.Module):
    """SwiGLU with the gate and up projections fused into one matmul (`gate_up_proj`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_up_proj = nn.Linear(hidden, 2 * inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, D] -> [B, T, D]
        gate_up = self.gate_up_proj(x)
        if compiled_ops(gate_up):
            return self.down_proj(qkernels.silu_mul(gate_up))  # one call: e^ by the attention's exp8
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


# Fused parameters and the checkpoint tensors they are made of, concatenated along the outputs.
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def checkpoint_names(name: str) -> tuple[str, ...]:
    """The checkpoint tensors a block parameter is read from (`self_attn.qkv_proj.weight` -> q, k, v)."""
    module, _, leaf = name.rpartition(".")
    parts = FUSED.get(module)
    return tuple(f"{part}.{leaf}" for part in parts) if parts else (name,)


class DecoderBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache, layer: int, mask: torch.Tensor | None) -> torch.Tensor:
        # x: [B, T, D] -> [B, T, D]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask(past: int, new: int, sliding_window: int | None) -> torch.Tensor | None:
    """Boolean [new, past + new] mask: query i (position past + i) sees keys at positions <= its own.

    None when every key is visible (a single decoded token with no sliding window in reach).
    """
    total = past + new
    if new == 1 and (sliding_window is None or total <= sliding_window):
        return None
    query_pos = torch.arange(past, total).unsqueeze(1)  # [new, 1]
    key_pos = torch.arange(total).unsqueeze(0)  # [1, total]
    visible = key_pos <= query_pos
    if sliding_window is not None:
        visible &= query_pos - key_pos < sliding_window
    return visible
