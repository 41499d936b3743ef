"""The face shard/ shows the network: what a node runs, what a client keeps, in numpy arrays.

mesh/ and node/ hold these and never a torch tensor. The real implementations are
`shard.span.SpanModel` (with `shard.kv_cache.KVCache`) and `shard.head.ClientHead`; the
simulator's stand-ins (`simulations.compute`) implement the same protocols with modelled
compute. Arrays are float32 and C-contiguous: hidden states [batch, tokens, hidden_size].

Batching rule: `batch_rows` is how many rows (tokens x sequences) of unrelated callers one call
may take while each row still computes the bits it computes alone (`shard.batch.exact_batch_rows`).
1 means rows are not independent (float GEMMs round with the row count): no sharing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from shard.config import ModelConfig

# Steps of at most this many tokens compute each token's row with the bits a one-token step
# computes (`shard.blocks` attends row by row, the quantized linears treat rows independently, and
# float spans run such steps token by token): a client may check drafted tokens in one step and keep
# any prefix of them, bit-identical to decoding them one at a time (`mesh.speculative`), and a
# replay may send any prefix of such a step.
ROW_EXACT_TOKENS = 16


@runtime_checkable
class Cache(Protocol):
    """One session's KV cache over a span: positions written so far, bytes reserved."""

    length: int
    batch: int
    max_length: int

    @property
    def nbytes(self) -> int: ...

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (to redo a step whose result was lost)."""


@dataclass(frozen=True)
class BatchStep:
    """One session's step in a shared pass: its input, its cache, the blocks it runs."""

    hidden: np.ndarray  # [B, T, D] float32
    cache: Cache  # the session's cache (layers = end - start)
    start: int  # first block the session runs (absolute index, within the span)
    end: int  # one past its last block


@runtime_checkable
class Span(Protocol):
    """Blocks [start, end) of one model, run over per-session caches."""

    start: int
    end: int
    config: ModelConfig
    quant: str  # "none", "int8", "int4": announced in span records

    @property
    def batch_rows(self) -> int:
        """Rows one `run_batch` may take, each exactly as alone (1: steps run one at a time)."""

    @property
    def chunk_invariant(self) -> bool:
        """Every position's output has the same bits however the positions were split into steps
        (a conversation prefilled in other chunks, a kept route continued: prefix reuse is exact)."""

    def sub_span(self, start: int, end: int) -> Span:
        """Blocks [start, end) of this span, sharing its weights."""

    def cache_bytes(self, batch: int, max_length: int) -> int: ...

    def new_cache(self, batch: int, max_length: int) -> Cache: ...

    def run(self, hidden: np.ndarray, cache: Cache, passes: Sequence[int] = ()) -> np.ndarray:
        """The blocks on `hidden` [B, T, D] at `cache.length`, as forward passes of `passes` tokens
        each (one pass when empty); advances the cache; `ShardError` on bad input, cache unchanged."""

    def run_batch(self, steps: Sequence[BatchStep]) -> list[np.ndarray | Exception]:
        """Each step's output, from one pass over all of them where they can share one; a step the
        pass cannot take gets its own `ShardError` and the others run without it."""

    def modelled_seconds(self, batch: int, tokens: int) -> float:
        """Compute time this span models for one pass (the simulator's, waited out in trio's
        clock); 0.0 for spans whose compute takes real time."""


@runtime_checkable
class Head(Protocol):
    """The client's part: token embeddings in, next-token logits out."""

    config: ModelConfig

    @property
    def batch_rows(self) -> int:
        """Sequences one `next_logits` call may take, each exactly as alone (1: no sharing)."""

    def embed_tokens(self, ids: Sequence[int]) -> np.ndarray:
        """One sequence's token ids -> hidden states [1, T, D] float32; `InvalidInput` for ids
        outside the vocabulary."""

    def next_logits(self, hidden: np.ndarray) -> np.ndarray:
        """Last hidden states [N, D] of N sequences -> next-token logits [N, V] float32."""
