"""Model configuration: a Hugging Face `config.json` read into a typed, validated `ModelConfig`.

Supports the Llama family (Llama 1/2/3 with `linear` and `llama3` rope scaling), Mistral and
Qwen2 (biased q/k/v projections). Both the transformers 4 layout (`rope_theta`, `rope_scaling`)
and the transformers 5 layout (`rope_parameters`) are understood.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shard.errors import ConfigError, UnsupportedArchitecture
from shard.manifest import Manifest, load_manifest

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # one of _ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    factors: tuple[float, ...] = ()  # kind "factors" (GGUF's rope_freqs): each frequency divided by its own


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig = field(default_factory=RopeConfig)
    attention_bias: bool = False  # Llama: q, k, v and o carry biases
    qkv_bias: bool = False  # Qwen2: only q, k and v carry biases
    mlp_bias: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


_READ_MANIFEST = object()  # load_config's default: read the directory's manifest itself


def load_config(model_dir: str | Path, *, verify: bool = True, manifest: Manifest | None | object = _READ_MANIFEST
                ) -> ModelConfig:
    """Read and validate `model_dir/config.json` (checked against the manifest when there is one:
    `manifest`, when the caller has read it already, else the directory's own)."""
    path = Path(model_dir) / "config.json"
    if verify:
        if manifest is _READ_MANIFEST:
            manifest = load_manifest(model_dir)
        if manifest is not None:
            manifest.verify_file(model_dir, "config.json")
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"no config.json in {model_dir}") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(raw).__name__}")
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    architecture = _architecture(raw)
    hidden = _int(raw, "hidden_size")
    heads = _int(raw, "num_attention_heads")
    kv_heads = _int(raw, "num_key_value_heads", default=heads)
    head_dim = raw.get("head_dim") or (hidden // heads if heads else 0)
    head_dim = _int({"head_dim": head_dim}, "head_dim")
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    is_qwen = architecture == "Qwen2ForCausalLM"
    config = ModelConfig(
        architecture=architecture,
        vocab_size=_int(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(raw, "intermediate_size"),
        num_layers=_int(raw, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=_int(raw, "max_position_embeddings", default=2048),
        rms_norm_eps=_float(raw, "rms_norm_eps", default=1e-6),
        rope=_rope(raw),
        attention_bias=bool(raw.get("attention_bias", False)) and not is_qwen,
        qkv_bias=is_qwen,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        sliding_window=_sliding_window(raw, architecture),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=_optional_int(raw.get("bos_token_id")),
        eos_token_ids=_eos_ids(raw.get("eos_token_id")),
    )
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={raw['hidden_act']!r} is not supported (only 'silu')")
    return config


def _architecture(raw: dict[str, Any]) -> str:
    names = raw.get("architectures") or []
    if not names and raw.get("model_type") in _MODEL_TYPES:
        names = [_MODEL_TYPES[raw["model_type"]]]
    if not isinstance(names, list) or not names:
        raise UnsupportedArchitecture(str(raw.get("model_type", "<none>")), SUPPORTED_ARCHITECTURES)
    name = str(names[0])
    if name not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(name, SUPPORTED_ARCHITECTURES)
    return name


def _rope(raw: dict[str, Any]) -> RopeConfig:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"rope parameters must be an object, not {params!r}")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise ConfigError(f"rope type {kind!r} is not supported; supported: {', '.join(_ROPE_TYPES)}")
    rope = RopeConfig(
        theta=_float({"rope_theta": theta}, "rope_theta"),
        kind=kind,
        factor=_float(params, "factor", default=1.0),
        low_freq_factor=_float(params, "low_freq_factor", default=1.0),
        high_freq_factor=_float(params, "high_freq_factor", default=4.0),
        original_max_position_embeddings=_int(
            params, "original_max_position_embeddings", default=raw.get("max_position_embeddings", 8192)
        ),
    )
    if kind == "llama3" and rope.high_freq_factor <= rope.low_freq_factor:
        raise ConfigError(
            f"llama3 rope needs high_freq_factor > low_freq_factor, got {rope.high_freq_factor} <= {rope.low_freq_factor}"
        )
    return rope


def _sliding_window(raw: dict[str, Any], architecture: str) -> int | None:
    window = raw.get("sliding_window")
    if window is None:
        return None
    if architecture == "Qwen2ForCausalLM" and not raw.get("use_sliding_window", False):
        return None
    return _int({"sliding_window": window}, "sliding_window")


# Upper bounds on what a config may claim, far above any model released (the largest have a
# vocabulary of ~256k, a hidden size of ~25k, ~130 layers and contexts of ~10M positions): a
# config.json is untrusted input, and every size is later multiplied into an allocation.
LIMITS = {
    "vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 19, "num_hidden_layers": 1 << 10,
    "num_attention_heads": 1 << 10, "num_key_value_heads": 1 << 10, "head_dim": 1 << 11,
    "max_position_embeddings": 1 << 24, "original_max_position_embeddings": 1 << 24, "sliding_window": 1 << 24,
}


def _int(raw: dict[str, Any], key: str, default: Any = None) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"config field {key!r} must be a positive integer, got {value!r}")
    if value > LIMITS.get(key, value):
        raise ConfigError(f"config field {key!r} is {value}, beyond the {LIMITS[key]} any supported model needs")
    return value


def _float(raw: dict[str, Any], key: str, default: Any = None) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"config field {key!r} must be a positive number, got {value!r}")
    return float(value)


def _optional_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _eos_ids(value: Any) -> tuple[int, ...]:
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, int) and not isinstance(v, bool))
    single = _optional_int(value)
    return (single,) if single is not None else ()
