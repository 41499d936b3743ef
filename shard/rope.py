"""Rotary position embeddings: inverse frequencies (default, `linear`, `llama3`, per-frequency
`factors` as GGUF files store Llama 3's) and their application."""

from __future__ import annotations

import math

import torch

from shard.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """The per-pair rotation frequencies, [head_dim // 2] fp32, after the config's rope scaling."""
    rope, dim = config.rope, config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.kind == "factors":
        return inv_freq / torch.tensor(rope.factors, dtype=torch.float32)
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        return _llama3_scaled(inv_freq, rope.factor, rope.low_freq_factor, rope.high_freq_factor,
                              rope.original_max_position_embeddings)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, factor: float, low: float, high: float, context: int) -> torch.Tensor:
    low_freq_wavelen, high_freq_wavelen = context / low, context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotary_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for `positions` ([T] or [B, T]), each [..., T, head_dim], computed in fp32."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [..., T, head_dim / 2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [..., T, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, heads, T, head_dim]; cos, sin: [T, head_dim] or [B, 1, T, head_dim]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
