"""Shared fixtures: tiny random checkpoints of each supported family, saved with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

FAMILIES = ("llama", "llama3", "mistral", "qwen2")

_BASE = dict(
    vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    rms_norm_eps=1e-5, initializer_range=0.08, bos_token_id=1, eos_token_id=2,
)


def tiny_config(family: str, **overrides):
    """A transformers config of `family` small enough to build in milliseconds."""
    import transformers

    fields = dict(_BASE)
    if family == "llama":
        cls = transformers.LlamaConfig
        fields.update(rope_theta=10000.0)
    elif family == "llama3":
        cls = transformers.LlamaConfig
        fields.update(head_dim=24, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    elif family == "llama-linear":
        cls = transformers.LlamaConfig
        fields.update(rope_scaling={"rope_type": "linear", "factor": 2.0})
    elif family == "mistral":
        cls = transformers.MistralConfig
        fields.update(sliding_window=5, num_key_value_heads=1)
    elif family == "qwen2":
        cls = transformers.Qwen2Config
        fields.update(tie_word_embeddings=True)
    else:
        raise ValueError(family)
    fields.update(overrides)
    return cls(**fields)


def save_tiny_checkpoint(path: Path, family: str, *, dtype=torch.float32, shard_size: str | None = None,
                         seed: int = 0, **overrides) -> Path:
    """Save a random model of `family` under `path` (sharded when `shard_size` is given)."""
    import transformers

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    model.eval()
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """Build (once per session) and return the directory of a tiny checkpoint."""
    cache: dict[tuple, Path] = {}

    def make(family: str, *, dtype=torch.float32, shard_size: str | None = None, **overrides) -> Path:
        key = (family, str(dtype), shard_size, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"ckpt-{family}")
            cache[key] = save_tiny_checkpoint(path, family, dtype=dtype, shard_size=shard_size, **overrides)
        return cache[key]

    return make
