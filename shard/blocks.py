"""Llama-family decoder blocks: RMSNorm, grouped-query attention over a KV cache, SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shard.config import ModelConfig
from shard.kv_cache import KVCache
from shard.rope import apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, D]; normalised in fp32 whatever the compute dtype, like the reference
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache, layer: int, mask: torch.Tensor | None) -> torch.Tensor:
        # x: [B, T, D]
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, T, hd]
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        keys, values = cache.update(layer, k.to(cache.keys.dtype), v.to(cache.values.dtype))  # [B, KV, L, hd]
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads
        )  # [B, H, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU with the gate and up projections fused into one matmul (`gate_up_proj`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_up_proj = nn.Linear(hidden, 2 * inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, D] -> [B, T, D]
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
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
