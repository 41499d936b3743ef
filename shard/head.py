"""The client's part of the model: token embeddings in, final norm and LM head out.

These stay on the user's device, so token ids and logits never cross the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shard.batch import exact_batch_rows
from shard.blocks import RMSNorm
from shard.checkpoint import Checkpoint
from shard.compute import return_free_memory
from shard.config import ModelConfig
from shard.errors import CorruptCheckpoint, InvalidInput, QuantizationError
from shard.model_dir import OpenModel, open_model_dir
from shard.quant import QUANT_MODES, Int4Linear, Int8Linear, prepare_kernels_
from shard.quant_swap import quantize_linears_

EMBED_NAME, NORM_NAME, LM_HEAD_NAME = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


class ClientHead(nn.Module):
    def __init__(self, config: ModelConfig, embed: torch.Tensor, norm: torch.Tensor, lm_head: nn.Module):
        super().__init__()
        self.config = config
        self.embed_weight = nn.Parameter(embed, requires_grad=False)  # [V, D]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm.weight = nn.Parameter(norm, requires_grad=False)
        self.lm_head = lm_head

    @torch.inference_mode()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [B, T] int64 -> [B, T, D]
        if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
            raise InvalidInput(f"token ids must be an integer [batch, tokens] tensor, got {ids.dtype} {list(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            bad = int(ids.max()) if int(ids.max()) >= self.config.vocab_size else int(ids.min())
            raise InvalidInput(f"token id {bad} is outside the vocabulary of {self.config.vocab_size}")
        return F.embedding(ids, self.embed_weight)

    # The numpy face (`shard.interfaces.Head`): what a client calls.

    @property
    def batch_rows(self) -> int:
        """Sequences one `next_logits` call may take, each row's logits bit-identical to computing
        it alone (the quantized heads' kernels compute rows independently; a float GEMM does not)."""
        if isinstance(self.lm_head, Int8Linear):
            return exact_batch_rows("int8")
        return exact_batch_rows("int4") if isinstance(self.lm_head, Int4Linear) else 1

    def embed_tokens(self, ids: Sequence[int]) -> np.ndarray:
        """One sequence's ids -> [1, T, D] float32."""
        tokens = torch.tensor([list(ids)], dtype=torch.int64) if len(ids) != 1 else torch.full((1, 1), int(ids[0]))
        hidden = self.embed(tokens)  # torch.full: a third of torch.tensor's cost, per decoded token
        return (hidden if hidden.dtype == torch.float32 else hidden.to(torch.float32)).numpy()

    def next_logits(self, hidden: np.ndarray) -> np.ndarray:
        """Last hidden states [N, D] -> next-token logits [N, V] float32."""
        if hidden.ndim != 2:
            raise InvalidInput(f"last hidden states must be [sequences, {self.config.hidden_size}], got {list(hidden.shape)}")
        return self.logits(torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32))[:, None])[:, 0].numpy()

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [B, T, D] -> [B, T, V] fp32
        if hidden.dim() != 3 or hidden.shape[-1] != self.config.hidden_size:
            raise InvalidInput(f"hidden states must be [batch, tokens, {self.config.hidden_size}], got {list(hidden.shape)}")
        normed = self.norm(hidden.to(self.embed_weight.dtype))
        return self.lm_head(normed).to(torch.float32)


def load_head(model_dir: OpenModel | str | Path, *, quant: str = "none", group_size: int = 32,
              dtype: torch.dtype = torch.float32, verify: bool = True) -> ClientHead:
    """Embeddings, final norm and LM head (tied to the embeddings or not) of `model_dir` (open, or a
    path); `quant` applies to the LM head."""
    if quant not in QUANT_MODES:
        raise QuantizationError(f"quantization {quant!r} is not one of {', '.join(QUANT_MODES)}")
    opened = open_model_dir(model_dir, verify=verify)
    config, checkpoint = opened.config, opened.checkpoint()
    embed = _read(checkpoint, EMBED_NAME, (config.vocab_size, config.hidden_size), dtype)
    norm = _read(checkpoint, NORM_NAME, (config.hidden_size,), dtype)
    tied = head_is_tied(config, checkpoint)
    head_weight = embed if tied else _read(checkpoint, LM_HEAD_NAME, (config.vocab_size, config.hidden_size), dtype)
    lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device="meta")
    # a tied head shares the embedding storage unless it is quantized (then it gets its own copy)
    lm_head.weight = nn.Parameter(head_weight if quant == "none" else head_weight.to(torch.float32), requires_grad=False)
    container = nn.Sequential(lm_head)
    quantize_linears_(container, quant, group_size)
    if quant != "none":
        prepare_kernels_(container)  # its weights to huge pages now, and the fp32 copy's memory back
        return_free_memory()
    return ClientHead(config, embed, norm, container[0])


def head_is_tied(config: ModelConfig, checkpoint: Checkpoint) -> bool:
    """Whether the LM head is the embeddings (said so, or no lm_head tensor to read)."""
    return config.tie_word_embeddings or not checkpoint.has(LM_HEAD_NAME)


def head_tensor_names(config: ModelConfig, checkpoint: Checkpoint) -> list[str]:
    """The checkpoint tensors `load_head` reads: embeddings, final norm, and the LM head unless tied."""
    return [EMBED_NAME, NORM_NAME] + ([] if head_is_tied(config, checkpoint) else [LM_HEAD_NAME])


def _read(checkpoint: Checkpoint, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    tensor = checkpoint.read(name, dtype)
    if tuple(tensor.shape) != shape:
        raise CorruptCheckpoint(f"tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}")
    return tensor
