"""A span: the contiguous blocks [start, end) of one model, loaded lazily and run over a KV cache.

`load_span` reads only the span's tensors, block by block, quantizing each block as it arrives so
that peak memory is the quantized span plus one float block. `save_span` / `load_saved_span` keep
an already-quantized span on disk so a node need not redo the work at its next start.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from shard.batch import ROW_EXACT, BatchItem, exact_batch_rows, forward_batch
from shard.blocks import DecoderBlock, attention_mask, checkpoint_names
from shard.checkpoint import Checkpoint
from shard.compute import return_free_memory
from shard.config import ModelConfig, RopeConfig
from shard.errors import CorruptCheckpoint, InvalidInput, PromptTooLong, QuantizationError, ShardError, SpanOutOfRange
from shard.interfaces import ROW_EXACT_TOKENS, BatchStep
from shard.kv_cache import KVCache
from shard.model_dir import QUANT_CHOICES, OpenModel, open_model_dir, resolve_quant
from shard import block_step, qkernels
from shard.quant import QUANT_MODES, Int4Linear, prepare_kernels_
from shard.quant_swap import empty_quantized_linears_, quantize_linears_
from shard.rope import inverse_frequencies, rotary_tables

SAVED_SPAN_FORMAT = "hearth-span/2"  # 2: fused qkv and gate/up projections


class SpanModel(nn.Module):
    def __init__(self, config: ModelConfig, start: int, end: int, *,
                 dtype: torch.dtype = torch.float32, quant: str = "none", group_size: int = 32):
        super().__init__()
        check_span(config, start, end)
        self.config, self.start, self.end = config, start, end
        self.dtype, self.quant, self.group_size = dtype, quant, group_size
        with torch.device("meta"):
            self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(end - start))
        self.register_buffer("inv_freq", inverse_frequencies(config), persistent=False)

    def sub_span(self, start: int, end: int) -> SpanModel:
        """Blocks [start, end) of this span as a span of their own, sharing the weights."""
        if not self.start <= start < end <= self.end:
            raise SpanOutOfRange(start, end, self.config.num_layers)
        view = SpanModel.__new__(SpanModel)
        nn.Module.__init__(view)
        view.config, view.start, view.end = self.config, start, end
        view.dtype, view.quant, view.group_size = self.dtype, self.quant, self.group_size
        view.blocks = nn.ModuleList(self.blocks[start - self.start : end - self.start])
        view.register_buffer("inv_freq", self.inv_freq, persistent=False)
        return view

    def new_cache(self, batch: int, max_length: int) -> KVCache:
        if not 0 < max_length <= self.config.max_position_embeddings:
            raise PromptTooLong(max_length, self.config.max_position_embeddings)
        return KVCache(len(self.blocks), batch, self.config.num_kv_heads, self.config.head_dim,
                       max_length, self.dtype)

    def cache_bytes(self, batch: int, max_length: int) -> int:
        return KVCache.bytes_needed(len(self.blocks), batch, self.config.num_kv_heads,
                                    self.config.head_dim, max_length, self.dtype)

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, cache: KVCache) -> torch.Tensor:
        # hidden: [B, T, D] -> [B, T, D], positions cache.length .. cache.length + T - 1
        B, T, D = self.check_input(hidden, cache)
        cache.check_room(T)
        if 1 < T <= ROW_EXACT_TOKENS and self.quant not in ROW_EXACT:  # float GEMMs round with the row count
            return torch.cat([self(hidden[:, i : i + 1], cache) for i in range(T)], dim=1)
        positions = torch.arange(cache.length, cache.length + T)
        cos, sin = rotary_tables(self.inv_freq, positions, self.dtype)
        mask = attention_mask(cache.length, T, self.config.sliding_window)
        x = hidden.to(self.dtype)
        compiled = self.compiled_blocks(B * T, [cache])
        if compiled is not None:  # the same kernels in one call: the same bits (shard.block_step)
            config = self.config
            x = block_step.step(compiled, x, cache, cos, sin, heads=config.num_heads, kv_heads=config.num_kv_heads,
                                head_dim=config.head_dim, window=config.sliding_window)
        else:
            for layer, block in enumerate(self.blocks):
                x = block(x, cos, sin, cache, layer, mask)
        cache.advance(T)
        return x

    def compiled_blocks(self, rows: int, caches: Sequence[KVCache]) -> list[block_step.BlockWeights] | None:
        """The blocks' weights for `shard.block_step` where it can run a pass of `rows` rows over
        `caches` (one session's, or a batch's: `shard.batch`), else None."""
        if (rows > block_step.MAX_ROWS or self.quant not in ROW_EXACT or self.dtype != torch.float32
                or any(cache.keys.dtype != torch.float32 for cache in caches) or torch.is_grad_enabled()):
            return None
        weights = [block_step.weights_of(block) for block in self.blocks]
        return None if any(w is None for w in weights) else weights

    def forward_batch(self, items: Sequence[BatchItem]) -> list[torch.Tensor]:
        """Several sessions' steps (`shard.batch.BatchItem`s) in one pass; see `shard.batch`."""
        return forward_batch(self, items)

    # The numpy face (`shard.interfaces.Span`): what a node calls.

    @property
    def batch_rows(self) -> int:
        return exact_batch_rows(self.quant)

    @property
    def chunk_invariant(self) -> bool:
        """Row-exact linears (int8, int4) and the compiled attention, which computes each query row
        alone (`shard.blocks.compiled_attention`); float GEMMs round with the row count."""
        return self.quant in ROW_EXACT and self.dtype == torch.float32 and qkernels.available()

    def modelled_seconds(self, batch: int, tokens: int) -> float:
        return 0.0  # real compute takes real time

    def run(self, hidden: np.ndarray, cache: KVCache, passes: Sequence[int] = ()) -> np.ndarray:
        """`forward` on a numpy array [B, T, D], as forward passes of `passes` tokens each; float32 out."""
        inputs = torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32))
        if len(passes) <= 1:  # one pass: a decode step, or a prefill chunk
            return _as_array(self(inputs, cache))
        if sum(passes) != inputs.shape[1] or min(passes) <= 0:
            raise InvalidInput(f"passes {list(passes)} do not split the step's {inputs.shape[1]} tokens")
        return _as_array(torch.cat([self(part, cache) for part in inputs.split(list(passes), dim=1)], dim=1))

    def run_batch(self, steps: Sequence[BatchStep]) -> list[np.ndarray | Exception]:
        """Each step's output from one pass (`shard.batch`); a step the pass cannot take gets its
        own `ShardError` and the others run without it (checked before any cache moves)."""
        if len(steps) == 1:
            return [self._run_alone(steps[0])]
        items = [BatchItem(torch.from_numpy(np.ascontiguousarray(step.hidden, dtype=np.float32)), step.cache,
                           step.start, step.end) for step in steps]
        try:
            return [_as_array(out) for out in self.forward_batch(items)]
        except ShardError:  # validated before any cache moved: find the culprit by running each alone
            return [self._run_alone(step) for step in steps]

    def _run_alone(self, step: BatchStep) -> np.ndarray | Exception:
        try:
            view = self if (step.start, step.end) == (self.start, self.end) else self.sub_span(step.start, step.end)
            return view.run(step.hidden, step.cache)
        except ShardError as err:
            return err

    def check_input(self, hidden: torch.Tensor, cache: KVCache) -> tuple[int, int, int]:
        if hidden.dim() != 3 or hidden.shape[2] != self.config.hidden_size or hidden.shape[1] == 0:
            raise InvalidInput(
                f"hidden states must be [batch, tokens>0, {self.config.hidden_size}], got {list(hidden.shape)}"
            )
        if hidden.shape[0] != cache.batch:
            raise InvalidInput(f"batch of {hidden.shape[0]} sequences sent to a session of batch {cache.batch}")
        if not hidden.is_floating_point():
            raise InvalidInput(f"hidden states must be floating point, got {hidden.dtype}")
        return tuple(hidden.shape)


def _as_array(hidden: torch.Tensor) -> np.ndarray:
    return (hidden if hidden.dtype == torch.float32 else hidden.to(torch.float32)).numpy()


def block_bytes(config: ModelConfig, quant: str = "none", group_size: int = 32,
                dtype: torch.dtype = torch.float32) -> int:
    """Bytes one block's weights take in memory once loaded with `quant` (built on the meta device)."""
    if quant not in QUANT_MODES:
        raise QuantizationError(f"quantization {quant!r} is not one of {', '.join(QUANT_MODES)}")
    with torch.device("meta"):
        block = DecoderBlock(config).to(torch.float32 if quant != "none" else dtype)
    empty_quantized_linears_(block, quant, group_size)
    return sum(t.numel() * t.element_size() for t in (*block.parameters(), *block.buffers()))


def block_prefix(layer: int) -> str:
    """Where block `layer`'s tensors sit among a checkpoint's (Hugging Face) names."""
    return f"model.layers.{layer}."


def block_tensor_names(config: ModelConfig, layer: int) -> list[str]:
    """The checkpoint tensors `load_span` reads for block `layer` (each fused parameter's parts)."""
    with torch.device("meta"):
        block = DecoderBlock(config)
    return [block_prefix(layer) + part for name in block.state_dict() for part in checkpoint_names(name)]


def check_span(config: ModelConfig, start: int, end: int) -> None:
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= config.num_layers):
        raise SpanOutOfRange(start, end, config.num_layers)


def load_span(model_dir: OpenModel | str | Path, start: int, end: int, *, quant: str = "none", group_size: int = 32,
              dtype: torch.dtype = torch.float32, verify: bool = True) -> SpanModel:
    """Blocks [start, end) of the model at `model_dir` (open, or a path), quantized as asked
    ("auto": as the model's own weights are). Weights already in Hearth's int4 groups (a GGUF
    file's 4-bit blocks) are taken as they are, never dequantized and quantized again."""
    opened = open_model_dir(model_dir, verify=verify)
    quant, group_size = resolve_quant(opened, quant, group_size)
    if quant not in QUANT_MODES:
        raise QuantizationError(f"quantization {quant!r} is not one of {', '.join(QUANT_CHOICES)}")
    if quant != "none":
        dtype = torch.float32  # quantized linears take and return fp32 activations
    model = SpanModel(opened.config, start, end, dtype=dtype, quant=quant, group_size=group_size)
    checkpoint = opened.checkpoint()
    for offset, block in enumerate(model.blocks):
        prefix = block_prefix(start + offset)
        read_dtype = torch.float32 if quant != "none" else dtype
        native = _adopt_int4_(block, checkpoint, prefix) if (quant, group_size) == ("int4", 32) else {}
        state = {name: native[name] if name in native else _read_fused(checkpoint, prefix, name, meta.shape, read_dtype)
                 for name, meta in block.state_dict().items()}
        block.load_state_dict(state, assign=True)
        quantize_linears_(block, quant, group_size)
        if quant != "none":  # own the norms' weights (views of the mapped file until now) and let
            for param in block.parameters():  # the file go: the next block's pages replace this one's
                param.data = param.data.clone()
            checkpoint.release()
            return_free_memory()  # and the block's fp32 temporaries: freed, not yet the system's
    if quant != "none":
        prepare_kernels_(model)  # the kernels' weights to huge pages now (each move gives its pages back)
    return model


def _adopt_int4_(block: DecoderBlock, checkpoint, prefix: str) -> dict[str, torch.Tensor]:
    """Put an empty `Int4Linear` in place of each linear of `block` whose checkpoint tensors are
    int4 groups of 32 already (`read_int4`, GGUF's 4-bit types); their saved tensors, by name."""
    read_int4 = getattr(checkpoint, "read_int4", None)
    if read_int4 is None:
        return {}
    state = {}
    for module_name, module in list(block.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        parts = [read_int4(prefix + name) for name in checkpoint_names(f"{module_name}.weight")]
        if any(part is None for part in parts):
            continue  # another type: read as floats and quantized like any checkpoint
        parent, _, leaf = module_name.rpartition(".")
        setattr(block.get_submodule(parent), leaf, Int4Linear(
            module.in_features, module.out_features, module.bias is not None, 32, device="meta"))
        for i, key in enumerate(("qweight", "scales", "zeros")):
            state[f"{module_name}.{key}"] = torch.cat([part[i] for part in parts])
    return state


def _read_fused(checkpoint: Checkpoint, prefix: str, name: str, shape: torch.Size,
                dtype: torch.dtype) -> torch.Tensor:
    """A block parameter from its checkpoint tensor(s), concatenated when the block fuses them."""
    parts = [checkpoint.read(prefix + part, dtype) for part in checkpoint_names(name)]
    for part_name, part in zip(checkpoint_names(name), parts):
        if part.dim() != len(shape) or part.shape[1:] != shape[1:]:
            raise CorruptCheckpoint(f"tensor {prefix + part_name!r} has shape {list(part.shape)}, "
                                    f"expected [*, {', '.join(map(str, shape[1:]))}]")
    tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
    if tensor.shape != shape:
        names = " + ".join(prefix + n for n in checkpoint_names(name))
        raise CorruptCheckpoint(f"tensor {names!r} has shape {list(tensor.shape)}, expected {list(shape)}")
    return tensor


def save_span(model: SpanModel, path: str | Path, *, source_digest: str = "") -> None:
    """Write a (quantized) span with everything needed to load it without the original checkpoint."""
    header = {
        "format": SAVED_SPAN_FORMAT, "start": model.start, "end": model.end, "quant": model.quant,
        "group_size": model.group_size, "dtype": str(model.dtype).removeprefix("torch."),
        "config": dataclasses.asdict(model.config), "source_digest": source_digest,
    }
    state = {name: t.contiguous() for name, t in model.state_dict().items()}
    save_file(state, str(path), metadata={"hearth": json.dumps(header)})


def load_saved_span(path: str | Path) -> tuple[SpanModel, str]:
    """A span written by `save_span`, and the digest of the checkpoint it came from."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {})["hearth"])
            # cloned: tensors at a file offset may be misaligned for the packed kernels
            state = {name: handle.get_tensor(name).clone() for name in handle.keys()}
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise CorruptCheckpoint(f"{path} is not a saved Hearth span: {err!r}") from err
    except Exception as err:  # safetensors' own error type
        raise CorruptCheckpoint(f"{path} is not a valid safetensors file: {err}") from err
    if header.get("format") != SAVED_SPAN_FORMAT:
        raise CorruptCheckpoint(f"{path} has format {header.get('format')!r}, expected {SAVED_SPAN_FORMAT!r}")
    config = _config_from_saved(header["config"])
    model = SpanModel(config, header["start"], header["end"], dtype=getattr(torch, header["dtype"]),
                      quant=header["quant"], group_size=header["group_size"])
    for block in model.blocks:
        empty_quantized_linears_(block, model.quant, model.group_size)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CorruptCheckpoint(f"{path} does not match its header: missing {missing[:3]}, unexpected {unexpected[:3]}")
    prepare_kernels_(model)
    return_free_memory()
    return model, header.get("source_digest", "")


def _config_from_saved(raw: dict) -> ModelConfig:
    fields = dict(raw)
    fields["rope"] = RopeConfig(**{**fields["rope"], "factors": tuple(fields["rope"].get("factors", ()))})
    fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
    return ModelConfig(**fields)
