"""The model's first blocks, run on the client's own device so that no peer receives token embeddings.

Every node holds the same checkpoint, so the first hop of a route could look each vector it is
sent up in the embedding table and read the prompt and every generated token back. A client with
`local_blocks` K runs blocks [0, K) itself (`FirstBlocks`: loaded once from its own model
directory with `shard.span.load_span`, quantized as a node with `--quant auto` would load them),
each generation over a KV cache of its own (`LocalRun`), and plans its route over [K, n_blocks)
only. The local part never fails over; failover and replay work on the remote hops' histories,
which hold what left the device (the hidden states after block K), exactly as before.

What this buys, measured by benchmarks/bench_privacy.py (benchmarks/RESULTS.md): the embedding
table lookup stops working from K = 1, but hidden states after K blocks still carry the prompt. An
attacker holding the checkpoint matches them against K blocks' outputs for every single token
(recovers a large share of tokens) or searches each position's token with the recovered prefix
(recovers nearly all). K local blocks are a cost to an attacker, not a guarantee; keeping hidden
states among trusted devices (`--trust-peers`, `--swarm-secret`) is the protection.

Choosing K (`choose_local_blocks`): an explicit count, or `AUTO_BLOCKS`: one block when its weights and a
cache of `AUTO_CACHE_POSITIONS` positions take at most 1/`AUTO_MEMORY_SHARE` of the memory available
now, else none (a device that short of memory is told so in the log).
"""

from __future__ import annotations

import logging

import numpy as np
import trio
import trio.testing

from mesh.virtual_time import VirtualClock
from shard.compute import available_memory
from shard.errors import InvalidInput
from shard.interfaces import Cache, Span
from shard.model_dir import OpenModel, resolve_quant
from shard.span import block_bytes, load_span

log = logging.getLogger("hearth.client")

AUTO_BLOCKS = "auto"
AUTO_MEMORY_SHARE = 4  # auto runs a block here when it takes at most a quarter of the memory available
AUTO_CACHE_POSITIONS = 4096  # the cache counted with it (a node's default --max-length)
INLINE_MAX_TOKENS = 8  # steps of up to this many tokens run on the event loop; longer ones in a worker thread
CACHE_ELEMENT_BYTES = 4  # float32 keys and values, as `shard.span.SpanModel.new_cache` makes them


def choose_local_blocks(wanted: int | str, n_blocks: int, *, block_bytes: int, cache_bytes: int,
                        available_bytes: int) -> int:
    """How many first blocks to run here: `wanted` itself (checked: fewer than `n_blocks`, so a peer
    still has work), or for `AUTO_BLOCKS` one block when it fits `AUTO_MEMORY_SHARE` times in the memory
    available, else 0."""
    if wanted == AUTO_BLOCKS:
        fits = AUTO_MEMORY_SHARE * (block_bytes + cache_bytes) <= available_bytes
        return 1 if n_blocks > 1 and fits else 0
    check_local_blocks(wanted, n_blocks)
    return wanted


def check_local_blocks(wanted: object, n_blocks: int | None = None) -> None:
    """InvalidInput unless `wanted` is `AUTO_BLOCKS` or a block count in [0, n_blocks)."""
    if wanted == AUTO_BLOCKS:
        return
    if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 0:
        raise InvalidInput(f"local blocks must be a count >= 0 or {AUTO_BLOCKS!r}, got {wanted!r}")
    if n_blocks is not None and wanted >= n_blocks:
        raise InvalidInput(f"local blocks {wanted} leave no block of the model's {n_blocks} to the swarm "
                           f"(to run the whole model here: hearth run)")


class LocalRun:
    """One generation's pass through the first blocks: their KV cache, advanced step by step."""

    def __init__(self, span: Span, cache: Cache):
        self.span, self.cache = span, cache

    async def run(self, hidden: np.ndarray, position: int) -> np.ndarray:
        """The first blocks on `hidden` [1, T, D] at `position`. A position before the cache's end
        (the generation went back to a verified step) forgets the positions from there first."""
        if position < self.cache.length:
            self.cache.truncate(position)
        elif position > self.cache.length:
            raise InvalidInput(f"local blocks asked for position {position}; their cache holds {self.cache.length}")
        if hidden.shape[1] <= INLINE_MAX_TOKENS or _virtual_clock():
            return self.span.run(hidden, self.cache)
        return await trio.to_thread.run_sync(self.span.run, hidden, self.cache)


class FirstBlocks:
    """Blocks [0, count) of the model, loaded on this device, shared by its generations."""

    def __init__(self, span: Span):
        if span.start != 0:
            raise InvalidInput(f"a client's local blocks start at block 0, not {span.start}")
        self.span = span

    @property
    def count(self) -> int:
        return self.span.end

    @classmethod
    def load(cls, model: OpenModel, wanted: int | str, *, quant: str = "auto") -> FirstBlocks | None:
        """The first blocks `choose_local_blocks` picks for this device (None for none), loaded."""
        config = model.config
        check_local_blocks(wanted, config.num_layers)
        resolved, group_size = resolve_quant(model, quant, 32)
        count = wanted
        if wanted == AUTO_BLOCKS:
            weights = block_bytes(config, resolved, group_size)
            cache = (2 * config.num_kv_heads * config.head_dim * CACHE_ELEMENT_BYTES
                     * min(config.max_position_embeddings, AUTO_CACHE_POSITIONS))
            available = available_memory()
            count = choose_local_blocks(wanted, config.num_layers, block_bytes=weights, cache_bytes=cache,
                                        available_bytes=available)
            if count == 0:
                log.warning("local blocks: none (auto: one block takes %d MiB with its cache, %d MiB are "
                            "available); the first hop receives token embeddings, which give the prompt away",
                            (weights + cache) >> 20, available >> 20)
        if count == 0:
            return None
        blocks = cls(load_span(model, 0, count, quant=resolved, group_size=group_size))
        log.info("local blocks [0, %d) run on this device (%s): no peer receives token embeddings",
                 count, resolved)
        return blocks

    def start(self, max_length: int) -> LocalRun:
        """A generation of up to `max_length` positions: its own cache over these blocks."""
        return LocalRun(self.span, self.span.new_cache(1, max_length))


def _virtual_clock() -> bool:
    """Under a virtual clock (tests, the simulator) a worker thread's time is invisible, and the
    clock would jump past every deadline while it runs: compute inline there."""
    return isinstance(trio.lowlevel.current_clock(), (VirtualClock, trio.testing.MockClock))
