"""A whole model run in one process: the client head and a chain of spans, one KV cache per span.

This is what `hearth run` uses, and the reference the networked pipeline is compared against:
the same `SpanModel` code a node runs, called one span after another.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shard.config import ModelConfig
from shard.errors import InvalidInput, PromptTooLong
from shard.head import ClientHead, load_head
from shard.kv_cache import KVCache
from shard.model_dir import OpenModel, open_model_dir
from shard.span import SpanModel, load_span


def split_points(num_layers: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous spans covering [0, num_layers), as even as possible."""
    if not 1 <= parts <= num_layers:
        raise InvalidInput(f"cannot split {num_layers} blocks into {parts} spans")
    bounds = [round(i * num_layers / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class LocalPipeline:
    def __init__(self, head: ClientHead, spans: list[SpanModel]):
        self.head, self.spans = head, spans
        self.config: ModelConfig = head.config
        self.caches: list[KVCache] = []

    @classmethod
    def load(cls, model_dir: OpenModel | str | Path, *, parts: int = 1, quant: str = "none", group_size: int = 32,
             dtype: torch.dtype = torch.float32, head_quant: str = "none") -> "LocalPipeline":
        opened = open_model_dir(model_dir)
        spans = [load_span(opened, start, end, quant=quant, group_size=group_size, dtype=dtype)
                 for start, end in split_points(opened.config.num_layers, parts)]
        return cls(load_head(opened, quant=head_quant, dtype=dtype), spans)

    @property
    def length(self) -> int:
        return self.caches[0].length if self.caches else 0

    def start(self, batch: int, max_length: int) -> None:
        """Open fresh caches for `batch` sequences of up to `max_length` tokens."""
        limit = self.config.max_position_embeddings
        if max_length > limit:
            raise PromptTooLong(max_length, limit)
        self.caches = [span.new_cache(batch, max_length) for span in self.spans]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [B, T] -> logits of the last position [B, V]
        if not self.caches:
            raise InvalidInput("call start() before forward()")
        if self.length + ids.shape[1] > self.caches[0].max_length:
            raise PromptTooLong(self.length + ids.shape[1], self.caches[0].max_length)
        hidden = self.head.embed(ids)
        for span, cache in zip(self.spans, self.caches):
            hidden = span(hidden, cache)
        return self.head.logits(hidden[:, -1:])[:, 0]
