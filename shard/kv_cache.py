"""The KV cache of one inference session over one span: preallocated keys and values per block."""

from __future__ import annotations

import torch

from shard.errors import CacheFull


class KVCache:
    """Keys and values for `num_layers` blocks, `batch` sequences, up to `max_length` positions.

    All sequences of a session share one length: position `length` is where the next token goes.
    The memory is allocated up front, so `nbytes` is what a node budgets when it opens a session.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
                 max_length: int, dtype: torch.dtype = torch.float32):
        shape = (num_layers, batch, num_kv_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype)
        self.values = torch.zeros(shape, dtype=dtype)
        self.batch = batch
        self.max_length = max_length
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @staticmethod
    def bytes_needed(num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
                     max_length: int, dtype: torch.dtype = torch.float32) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * batch * num_kv_heads * max_length * head_dim * element

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_length:
            raise CacheFull(self.length + new_tokens, self.max_length)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v ([B, kv_heads, T, head_dim]) for `layer`; return all keys and values so far."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (e.g. to redo a step whose result was lost)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length
