"""GGUF files made from Hugging Face checkpoints, the way llama.cpp's converter writes them, and
their reference: the tests' fixtures and the GGUF benchmark's models (not a user tool: K-quants
get random blocks).

`write_gguf` turns a tiny Hugging Face checkpoint into a `.gguf` file of one tensor type: metadata
under the architecture's keys, tensors renamed, each Llama head's q/k rows interleaved (the
converter's `permute`), linear weights quantized with the `gguf` package (K-quants, which it cannot
quantize, get random blocks with sane scales). `dequantized_dir` is the reference: the file read
back with the `gguf` package's own reader and dequantizer (not Hearth's), q/k rows restored, saved
as a Hugging Face directory of float32 weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from safetensors.torch import save_file

from shard.checkpoint import Checkpoint

FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
BLOCK_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
K_TYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
# where a K-quant block keeps its fp16 scales (offsets of d, and dmin where it has one)
_K_SCALE_OFFSETS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
GGUF_ARCH = {"llama": "llama", "llama3": "llama", "mistral": "llama", "qwen2": "qwen2"}

_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_tensor_name(hf: str) -> str:
    module, _, leaf = hf.rpartition(".")
    if module in _TOP:
        return f"{_TOP[module]}.{leaf}"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{_BLOCK[rest]}.{leaf}"


def interleave(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: each head's two rotary halves interleaved row by row."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def deinterleave(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir: Path, path: Path, qtype: Q, *, arch: str = "llama", seed: int = 0,
               metadata: dict | None = None) -> Path:
    """`hf_dir`'s model as a GGUF file whose linear weights (and embeddings) are `qtype`;
    `metadata` is written last (a key given twice keeps this value)."""
    config = json.loads((hf_dir / "config.json").read_text())
    checkpoint = Checkpoint(hf_dir, verify=False)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}  # transformers 5, 4
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(int(qtype))
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    for key, value in (metadata or {}).items():
        _add_metadata(writer, key, value)
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_factors(rope, theta, head_dim))
    for name in checkpoint.names:
        w = checkpoint.read(name, torch.float32).numpy()
        if name.endswith(("q_proj.weight", "q_proj.bias")) and arch == "llama":
            w = interleave(w, heads)
        elif name.endswith(("k_proj.weight", "k_proj.bias")) and arch == "llama":
            w = interleave(w, kv_heads)
        if w.ndim == 1:
            writer.add_tensor(gguf_tensor_name(name), np.ascontiguousarray(w, dtype=np.float32))
        else:
            data, kind = _encode(w, qtype, rng)
            writer.add_tensor(gguf_tensor_name(name), data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _encode(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> tuple[np.ndarray, Q]:
    """`w` as `qtype` blocks, or as F16 where its rows are not whole blocks (as llama.cpp falls back)."""
    block, size = GGML_QUANT_SIZES[qtype]
    if w.shape[1] % block:
        return w.astype(np.float16), Q.F16
    if qtype not in K_TYPES:
        return quantize(np.ascontiguousarray(w, dtype=np.float32), qtype), qtype
    blocks = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
    for offset in _K_SCALE_OFFSETS[qtype]:  # scales near what a real file has for weights of ~0.1
        scale = rng.uniform(0.001, 0.004, blocks.shape[:2]).astype(np.float16)
        blocks[..., offset:offset + 2] = scale[..., None].view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(w.shape[0], -1), qtype


def _llama3_factors(s: dict, base: float, head_dim: int) -> np.ndarray:
    """The converter's rope_freqs for llama3 scaling: each frequency's divisor."""
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def _add_metadata(writer: GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        (writer.add_uint32 if value < 1 << 32 else writer.add_uint64)(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))


def dequantized_dir(gguf_path: Path, hf_dir: Path, out: Path) -> Path:
    """The reference: `gguf_path`'s weights dequantized by the `gguf` package, as an HF directory
    (config.json from `hf_dir`, the checkpoint the file was made from)."""
    config = json.loads((hf_dir / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    reader = GGUFReader(str(gguf_path))
    arch = reader.fields["general.architecture"].contents()
    by_gguf = {gguf_tensor_name(name): name for name in Checkpoint(hf_dir, verify=False).names}
    state = {}
    for tensor in reader.tensors:
        if tensor.name not in by_gguf:
            continue
        name = by_gguf[tensor.name]
        w = dequantize(tensor.data, tensor.tensor_type).reshape([int(d) for d in tensor.shape[::-1]])
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = deinterleave(w, heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = deinterleave(w, kv_heads)
        state[name] = torch.from_numpy(np.array(w, dtype=np.float32))
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"))
    shutil.copy(hf_dir / "config.json", out / "config.json")
    return out
