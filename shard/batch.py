"""One forward pass for the steps of several independent sessions on one span.

Owns `BatchItem`, `check_items`, `forward_batch` and the exactness rule of sharing a pass
(`exact_batch_rows`), which node batching and the client's head follow. Decode is bound by reading the weights, so the steps of
concurrent sessions share one read: at each block the rows of every session that runs it are
stacked for the norms, the qkv projection, o_proj and the MLP, while rotary embeddings, the
attention mask and attention itself stay per session, over the session's own KV cache.

Exactness: every step computes what `span.sub_span(start, end)(hidden, cache)` computes alone.
The quantized linears treat rows independently, so for int8 and int4 spans the results are
bit-identical; fp32 GEMMs may round differently with the row count. int8 runs its packed kernel
for at most INT8_KERNEL_MAX_ROWS rows and a dequantizing GEMM above, so int8 rows go through the
linears in groups of at most that many (or one larger session alone): each session's rows then
take the path they would take alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from shard import block_step
from shard.blocks import Attention, DecoderBlock, attention_mask
from shard.errors import InvalidInput, SpanOutOfRange
from shard.interfaces import ROW_EXACT_TOKENS
from shard.kv_cache import KVCache
from shard.quant import INT8_KERNEL_MAX_ROWS
from shard.rope import rotary_tables

# Quantizations whose kernels compute each row on its own, so a step batched with others gives the
# bits it gives alone, and a replay after failover rebuilds the same KV cache. fp32/bf16 GEMMs
# round differently with the row count (~1e-6) and gain little from batching on CPUs (8 rows cost
# ~3x one here), so those run one caller at a time.
ROW_EXACT = frozenset({"int8", "int4"})
EXACT_BATCH_ROWS = 32  # rows of unrelated callers in one pass (int8 keeps each row exact up to 48)


def exact_batch_rows(quant: str) -> int:
    """How many rows (tokens x sequences) of unrelated callers one pass over weights quantized
    as `quant` may take, each row computing the bits it computes alone: 1 where rows interact."""
    return EXACT_BATCH_ROWS if quant in ROW_EXACT else 1


@dataclass(frozen=True)
class BatchItem:
    hidden: torch.Tensor  # [B, T, D] this session's input
    cache: KVCache  # the session's cache (layers = end - start)
    start: int  # first block this session runs (absolute block index, within the span)
    end: int  # one past its last block


@dataclass(frozen=True)
class _Step:
    """One item during a batched pass: its shape and its per-session attention inputs."""

    item: BatchItem
    batch: int
    tokens: int
    cos: torch.Tensor  # [T, head_dim]
    sin: torch.Tensor
    mask: torch.Tensor | None  # [T, past + T] or None

    @property
    def rows(self) -> int:
        return self.batch * self.tokens


@torch.inference_mode()
def forward_batch(span: torch.nn.Module, items: Sequence[BatchItem]) -> list[torch.Tensor]:
    """Each item's output [B, T, D], as if `span.sub_span(start, end)(hidden, cache)` ran for each
    (`span`: a `shard.span.SpanModel`, whose `run_batch` calls this).

    Every item is checked before any cache is written, so a bad item leaves all caches unchanged;
    then each cache advances by its item's T.
    """
    check_items(span, items)
    if not items:
        return []
    if span.quant not in ROW_EXACT and any(1 < item.hidden.shape[1] <= ROW_EXACT_TOKENS for item in items):
        # float spans run short steps token by token (`SpanModel.forward`, `ROW_EXACT_TOKENS`): so here
        return [_view(span, item)(item.hidden, item.cache) for item in items]
    steps = [_step(span, item) for item in items]
    compiled = span.compiled_blocks(sum(step.rows for step in steps), [item.cache for item in items])
    if compiled is not None:  # the whole pass in one compiled call, with the module path's bits
        outputs = _compiled_pass(span, compiled, steps)
    else:
        outputs = _module_pass(span, steps)
    for step in steps:
        step.item.cache.advance(step.tokens)
    return outputs


def _compiled_pass(span: torch.nn.Module, weights: list, steps: list[_Step]) -> list[torch.Tensor]:
    config = span.config
    segments = [block_step.Segment(step.item.hidden.to(torch.float32), step.item.cache, step.cos, step.sin,
                                   step.item.start - span.start, step.item.end - span.start) for step in steps]
    return block_step.run(weights, segments, heads=config.num_heads, kv_heads=config.num_kv_heads,
                          head_dim=config.head_dim, window=config.sliding_window)


def _module_pass(span: torch.nn.Module, steps: list[_Step]) -> list[torch.Tensor]:
    items = [step.item for step in steps]
    bounds = _offsets([step.rows for step in steps])
    D = span.config.hidden_size
    x = torch.cat([item.hidden.to(span.dtype).reshape(-1, D) for item in items])  # [N, D], N = sum of B * T
    for index, block in enumerate(span.blocks):
        block_index = span.start + index
        active = [i for i, item in enumerate(items) if item.start <= block_index < item.end]
        if len(active) == len(items):
            x = _block_forward(span, block, x, steps, block_index)
        elif active:
            rows = torch.cat([torch.arange(bounds[i], bounds[i + 1]) for i in active])
            part = x.index_select(0, rows)  # [M, D], the active items' rows
            x.index_copy_(0, rows, _block_forward(span, block, part, [steps[i] for i in active], block_index))
    return [x[bounds[i] : bounds[i + 1]].view(step.batch, step.tokens, -1) for i, step in enumerate(steps)]


def _view(span: torch.nn.Module, item: BatchItem) -> torch.nn.Module:
    return span if (item.start, item.end) == (span.start, span.end) else span.sub_span(item.start, item.end)


def check_items(span: torch.nn.Module, items: Sequence[BatchItem]) -> None:
    """Raise the typed error `span.sub_span(start, end)(hidden, cache)` would raise for a bad item."""
    seen: dict[int, int] = {}
    for position, item in enumerate(items):
        if not (isinstance(item.start, int) and isinstance(item.end, int)
                and span.start <= item.start < item.end <= span.end):
            raise SpanOutOfRange(item.start, item.end, span.config.num_layers)
        _, tokens, _ = span.check_input(item.hidden, item.cache)  # the span's own input rules
        _check_cache_shape(span, item)
        item.cache.check_room(tokens)
        if id(item.cache) in seen:
            raise InvalidInput(f"items {seen[id(item.cache)]} and {position} share one KV cache")
        seen[id(item.cache)] = position


def _check_cache_shape(span: torch.nn.Module, item: BatchItem) -> None:
    config, keys = span.config, item.cache.keys
    if keys.shape[0] != item.end - item.start:
        raise InvalidInput(f"a cache of {keys.shape[0]} layers sent to run blocks [{item.start}, {item.end})")
    if (keys.shape[2], keys.shape[4]) != (config.num_kv_heads, config.head_dim):
        raise InvalidInput(f"a cache of {keys.shape[2]} kv heads of width {keys.shape[4]} sent to a model "
                           f"of {config.num_kv_heads} kv heads of width {config.head_dim}")


def _step(span: torch.nn.Module, item: BatchItem) -> _Step:
    batch, tokens, _ = item.hidden.shape
    past = item.cache.length
    cos, sin = rotary_tables(span.inv_freq, torch.arange(past, past + tokens), span.dtype)
    return _Step(item, batch, tokens, cos, sin, attention_mask(past, tokens, span.config.sliding_window))


def _offsets(sizes: list[int]) -> list[int]:
    """[0, sizes[0], sizes[0] + sizes[1], ...]: where each item's rows begin, and the total."""
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return bounds


def _block_forward(span: torch.nn.Module, block: DecoderBlock, x: torch.Tensor, steps: list[_Step],
                   block_index: int) -> torch.Tensor:
    # x: [N, D], the rows of `steps` in order -> [N, D]
    attn = block.self_attn
    groups = _row_groups([step.rows for step in steps], span.quant)
    qkv = _dense(attn.qkv_proj, block.input_layernorm(x), groups)  # [N, q + 2 kv]
    bounds = _offsets([step.rows for step in steps])
    out = torch.cat([_attend(attn, qkv[bounds[i] : bounds[i + 1]], step, block_index - step.item.start)
                     for i, step in enumerate(steps)])  # [N, H * hd]
    x = x + _dense(attn.o_proj, out, groups)
    return x + _dense(block.mlp, block.post_attention_layernorm(x), groups)


def _attend(attn: Attention, qkv: torch.Tensor, step: _Step, layer: int) -> torch.Tensor:
    # qkv: [B * T, q + 2 kv], one session's rows -> [B * T, H * hd]; the code `Attention.forward` runs
    out = attn.attend(qkv.view(step.batch, step.tokens, -1), step.cos, step.sin, step.item.cache, layer, step.mask)
    return out.view(step.batch * step.tokens, -1)


def _row_groups(sizes: list[int], quant: str) -> list[tuple[int, int]]:
    """[begin, end) row ranges to run the linears on: all rows, or for int8 whole items in
    groups of at most INT8_KERNEL_MAX_ROWS rows (an item with more rows alone)."""
    total = sum(sizes)
    if quant != "int8" or total <= INT8_KERNEL_MAX_ROWS:
        return [(0, total)]
    groups, begin, end = [], 0, 0
    for size in sizes:
        if end > begin and end + size - begin > INT8_KERNEL_MAX_ROWS:
            groups.append((begin, end))
            begin = end
        end += size
    groups.append((begin, end))
    return groups


def _dense(module: torch.nn.Module, x: torch.Tensor, groups: list[tuple[int, int]]) -> torch.Tensor:
    # x: [N, in] -> [N, out], one call of `module` per row group
    if len(groups) == 1:
        return module(x)
    return torch.cat([module(x[begin:end]) for begin, end in groups])
