"""A GGUF file as a Hearth model: the same face as `shard.model_dir.ModelDir` (config, identity,
checkpoint, tokenizer), read from one `.gguf` file as llama.cpp, Ollama and LM Studio keep it.

- Config: from the file's `<arch>.*` metadata, validated by the same `config_from_dict` as a
  directory's config.json (Llama, Mistral and Qwen2 architectures).
- Tensors: under their Hugging Face names, so every loader works unchanged. llama.cpp's converter
  interleaves the rotary halves of each Llama head's q and k rows; reading undoes it.
- Identity: a manifest of one entry, the file's sha256 and piece hashes (shard/manifest.py, version
  2, pieces of the default size) under the fixed name "model.gguf", so every
  copy of the same file is the same model whatever it is called, and a directory of the same
  weights is a different one (proving equality would mean dequantizing both: not cheap).
- Quantization: `native_quant` says what the file's block types run as (shard/gguf_blocks.py).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from shard.config import ModelConfig, config_from_dict
from shard.errors import ConfigError, CorruptCheckpoint, MissingTensor, QuantizationError, UnsupportedArchitecture
from shard.gguf_blocks import INT4_GROUP, NATIVE, SUPPORTED, dequantize, int4_groups, type_names
from shard.gguf_format import MAGIC, GGUFFile, TensorInfo, read_gguf
from shard.manifest import Manifest, hash_file_pieces

SUFFIX = ".gguf"
IDENTITY_NAME = "model.gguf"  # the manifest's one entry, whatever the file is called
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_PERMUTED_ROPE = ("llama", "mistral")  # architectures whose q/k rows the converter interleaves

# Hugging Face name (after "model.layers.N.") -> GGUF name (after "blk.N.")
_BLOCK_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def is_gguf(path: str | Path) -> bool:
    """Whether `path` names a GGUF file: by its name, or by its first bytes (an Ollama blob is
    called sha256-...). A directory, or a path that is not there, is not."""
    path = Path(path)
    if path.suffix.lower() == SUFFIX:
        return not path.is_dir()
    try:
        with open(path, "rb") as file:
            return file.read(4) == MAGIC
    except OSError:  # a directory, or missing: the directory loader says what is wrong
        return False


def gguf_name(hf_name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`; unknown names unchanged."""
    module, _, leaf = hf_name.rpartition(".")
    if module in _TOP_NAMES:
        return f"{_TOP_NAMES[module]}.{leaf}"
    parts = module.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _BLOCK_NAMES:
        return f"blk.{parts[2]}.{_BLOCK_NAMES[parts[3]]}.{leaf}"
    return hf_name


class GGUFModel:
    """One `.gguf` file, parsed once; what every loader needs from it. `verify` is accepted for
    `ModelDir`'s signature: a GGUF file carries no manifest to check it against (its identity is
    its hash)."""

    def __init__(self, path: str | Path, *, verify: bool = True):
        self.path = Path(path)
        self.verify = verify
        self.file: GGUFFile = read_gguf(self.path)
        self.architecture = self.file.metadata.get("general.architecture")
        self.config: ModelConfig = gguf_config(self.file)
        _check_tensors(self.file, self.config)
        self._checkpoint: GGUFCheckpoint | None = None

    def __repr__(self) -> str:
        return f"GGUFModel({str(self.path)!r})"

    @property
    def name(self) -> str:
        """The file's name without `.gguf`: the model id a client shows."""
        return self.path.name[: -len(SUFFIX)] if self.path.name.lower().endswith(SUFFIX) else self.path.name

    @cached_property
    def manifest(self) -> Manifest:
        """A version-2 manifest of one entry, "model.gguf": the file's sha256, size and pieces (of
        the default `PIECE_BYTES`, so every copy has the same identity), hashed in one pass."""
        entry = hash_file_pieces(self.path)
        if entry.size != self.file.size:
            raise CorruptCheckpoint(f"{self.path} changed while open: {entry.size} bytes, was {self.file.size}")
        return Manifest({IDENTITY_NAME: entry})

    @property
    def identity(self) -> Manifest:
        """The manifest that names the model on the wire (a GGUF file's is always `manifest`)."""
        return self.manifest

    @cached_property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def native_quant(self) -> tuple[str, int]:
        """(quantization, int4 group size) the blocks' weights run as without requantizing: that
        of the type most of the blocks' linear weights have."""
        counts = Counter(info.qtype for name, info in self.file.tensors.items()
                         if name.startswith("blk.") and name.rsplit(".", 2)[-2] in _LINEARS)
        return NATIVE[counts.most_common(1)[0][0]], INT4_GROUP

    def checkpoint(self) -> GGUFCheckpoint:
        if self._checkpoint is None:
            self._checkpoint = GGUFCheckpoint(self.file, self.config, permute_rope=self.architecture in _PERMUTED_ROPE)
        return self._checkpoint

    def tokenizer(self):
        """The tokenizer and chat template the file's metadata describes."""
        from shard.gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(self.file.metadata, source=str(self.path))


class GGUFCheckpoint:
    """The file's tensors by Hugging Face name (the `shard.checkpoint.Checkpoint` face), plus
    `read_int4` for the types whose blocks are Hearth's int4 groups already."""

    def __init__(self, file: GGUFFile, config: ModelConfig, *, permute_rope: bool):
        self.file, self.config, self.permute_rope = file, config, permute_rope

    @property
    def names(self) -> list[str]:
        return sorted(self.file.tensors)

    def has(self, name: str) -> bool:
        return gguf_name(name) in self.file.tensors

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `name` (a Hugging Face name), dequantized to float32, then `dtype` if given."""
        info = self._info(name)
        values = dequantize(info)
        if len(info.shape) == 1:
            values = values.reshape(-1)[self._row_order(name, info.shape[0])]
        else:
            values = values[self._row_order(name, info.rows)].reshape(info.shape)
        tensor = torch.from_numpy(np.ascontiguousarray(values))
        return tensor if dtype is None else tensor.to(dtype)

    def read_int4(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Hearth's portable int4 (qweight, scales, zeros; groups of 32) holding the file's own
        codes, or None when the tensor's type is not a 4-bit one of groups of 32."""
        info = self._info(name)
        if len(info.shape) != 2:
            return None
        groups = int4_groups(TensorInfo(info.name, info.shape, info.qtype, info.data[self._row_order(name, info.rows)]))
        if groups is None:
            return None
        codes, scales, zeros = groups
        packed = codes[:, 0::2] | (codes[:, 1::2] << 4)  # shard.quant.pack_nibbles's layout, in numpy
        return (torch.from_numpy(packed), torch.from_numpy(scales).to(torch.bfloat16),
                torch.from_numpy(zeros).to(torch.bfloat16))

    def release(self) -> None:
        """Nothing to let go: the file stays mapped and its pages are the kernel's to evict."""

    def _info(self, name: str) -> TensorInfo:
        info = self.file.tensors.get(gguf_name(name))
        if info is None:
            raise MissingTensor(name, f"{self.file.path} (as {gguf_name(name)!r})")
        return info

    def _row_order(self, name: str, rows: int) -> np.ndarray | slice:
        """Rows of q and k in Hugging Face's order (each head's rotary halves apart), undoing the
        converter's interleaving; every other tensor's rows as they are."""
        module = name.rpartition(".")[0]
        if not self.permute_rope or not module.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            return slice(None)
        heads = self.config.num_heads if module.endswith("q_proj") else self.config.num_kv_heads
        if rows != heads * self.config.head_dim:
            raise CorruptCheckpoint(f"{self.file.path}: {gguf_name(name)!r} has {rows} rows, expected "
                                    f"{heads} heads x {self.config.head_dim}")
        return np.arange(rows).reshape(heads, self.config.head_dim // 2, 2).swapaxes(1, 2).reshape(-1)


def gguf_config(file: GGUFFile) -> ModelConfig:
    """The model's config from the file's metadata (one `ConfigError` line naming what is wrong)."""
    meta, tensors = file.metadata, file.tensors
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitecture(f"{arch!r} (GGUF general.architecture in {file.path})",
                                      tuple(ARCHITECTURES))

    def field(key: str, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, list):
            raise ConfigError(f"{file.path}: {arch}.{key} differs per layer ({value[:4]}...); not supported")
        return value

    embed = tensors.get("token_embd.weight")
    tokens = meta.get("tokenizer.ggml.tokens")
    raw = {
        "architectures": [ARCHITECTURES[arch]],
        "vocab_size": field("vocab_size") or (len(tokens) if isinstance(tokens, list) else None)
        or (embed.shape[0] if embed else None),
        "hidden_size": field("embedding_length"),
        "intermediate_size": field("feed_forward_length"),
        "num_hidden_layers": field("block_count"),
        "num_attention_heads": field("attention.head_count"),
        "num_key_value_heads": field("attention.head_count_kv", field("attention.head_count")),
        "max_position_embeddings": field("context_length", 2048),
        "rms_norm_eps": field("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": field("rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_output.bias" in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if field("attention.key_length") is not None:
        raw["head_dim"] = field("attention.key_length")
    scaling = field("rope.scaling.type", "none")
    if scaling == "linear":
        raw["rope_scaling"] = {"type": "linear", "factor": field("rope.scaling.factor")}
    elif scaling != "none":
        raise ConfigError(f"{file.path}: rope scaling {scaling!r} is not supported (none, linear)")
    try:
        config = config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{file.path}: {err} (from the GGUF metadata {arch}.*)") from None
    factors = tensors.get("rope_freqs.weight")
    if factors is not None:  # Llama 3.1+: per-frequency divisors, stored instead of the rope's parameters
        values = dequantize(factors).reshape(-1)
        if values.shape[0] != config.head_dim // 2 or not np.all(np.isfinite(values) & (values > 0)):
            raise ConfigError(f"{file.path}: rope_freqs.weight must hold {config.head_dim // 2} positive factors")
        config = dataclasses.replace(config, rope=dataclasses.replace(
            config.rope, kind="factors", factors=tuple(float(v) for v in values)))
    return config


def _check_tensors(file: GGUFFile, config: ModelConfig) -> None:
    """Every tensor the model uses is present, of a supported type and of its config's shape: a
    file that disagrees with its own metadata fails here, before any node serves it."""
    q, kv, d = config.q_size, config.kv_size, config.hidden_size
    expected = {"token_embd.weight": (config.vocab_size, d), "output_norm.weight": (d,)}
    if not config.tie_word_embeddings:
        expected["output.weight"] = (config.vocab_size, d)
    for i in range(config.num_layers):
        shapes = {"attn_norm.weight": (d,), "ffn_norm.weight": (d,), "attn_q.weight": (q, d),
                  "attn_k.weight": (kv, d), "attn_v.weight": (kv, d), "attn_output.weight": (d, q),
                  "ffn_gate.weight": (config.intermediate_size, d), "ffn_up.weight": (config.intermediate_size, d),
                  "ffn_down.weight": (d, config.intermediate_size)}
        if config.qkv_bias or config.attention_bias:
            shapes |= {"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)}
        if config.attention_bias:
            shapes["attn_output.bias"] = (d,)
        expected |= {f"blk.{i}.{name}": shape for name, shape in shapes.items()}
    for name, shape in expected.items():
        info = file.tensors.get(name)
        if info is None:
            raise MissingTensor(name, str(file.path))
        if info.qtype not in SUPPORTED:
            raise QuantizationError(f"{file.path}: tensor {name!r} is {info.qtype.name}, a type Hearth does not "
                                    f"read; supported: {type_names()}")
        if info.shape != shape:
            raise CorruptCheckpoint(f"{file.path}: tensor {name!r} has shape {list(info.shape)}, the metadata "
                                    f"says {list(shape)}")
