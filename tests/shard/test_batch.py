"""forward_batch: several sessions' steps in one pass give what each session's own forward gives."""

from __future__ import annotations

import copy

import pytest
import torch

from shard import block_step
from shard.batch import BatchItem, forward_batch
from shard.errors import CacheFull, InvalidInput, SpanOutOfRange
from shard.kv_cache import KVCache
from shard.span import SpanModel, load_span

SPAN = (1, 6)  # of the tiny checkpoints' 6 blocks: absolute block indices start at 1
MAX_LENGTH = 40
# Sessions as (start, end, batch, prefill length); the first one's range is a single block.
SESSIONS = [(1, 2, 1, 3), (2, 6, 3, 7), (1, 6, 2, 5), (1, 6, 1, 0), (3, 5, 2, 11)]
# Tokens per session at each step: decode and multi-token steps mixed, a prefill from position 0.
STEPS = [(1, 4, 1, 6, 1), (1, 1, 2, 1, 3), (1, 1, 1, 1, 1)]


def hidden_for(span: SpanModel, batch: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, tokens, span.config.hidden_size, generator=generator)


def open_sessions(span: SpanModel, sessions=SESSIONS, seed: int = 0) -> list[tuple[int, int, KVCache]]:
    """(start, end, cache) per session, each cache filled by a prefill of its length."""
    generator = torch.Generator().manual_seed(seed)
    opened = []
    for start, end, batch, prefill in sessions:
        view = span.sub_span(start, end)
        cache = view.new_cache(batch, MAX_LENGTH)
        if prefill:
            view(hidden_for(span, batch, prefill, generator), cache)
        opened.append((start, end, cache))
    return opened


def one_by_one(span: SpanModel, items: list[BatchItem]) -> list[torch.Tensor]:
    return [span.sub_span(item.start, item.end)(item.hidden, item.cache) for item in items]


def run_steps(span: SpanModel, steps=STEPS, sessions=SESSIONS):
    """Run `steps` both batched and one by one on twin caches; yield both outputs and caches per step."""
    batched = open_sessions(span, sessions)
    alone = copy.deepcopy(batched)
    generator = torch.Generator().manual_seed(1)
    for tokens in steps:
        hiddens = [hidden_for(span, cache.batch, t, generator) for (_, _, cache), t in zip(batched, tokens)]
        ours = forward_batch(span, [BatchItem(h, c, s, e) for h, (s, e, c) in zip(hiddens, batched)])
        ref = one_by_one(span, [BatchItem(h, c, s, e) for h, (s, e, c) in zip(hiddens, alone)])
        yield ours, ref, [c for _, _, c in batched], [c for _, _, c in alone]


def cache_state(cache: KVCache) -> tuple[int, torch.Tensor, torch.Tensor]:
    return cache.length, cache.keys.clone(), cache.values.clone()


def same_cache_state(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


@pytest.fixture(scope="module")
def spans(checkpoint_factory):
    """Spans of the tiny checkpoints, loaded once: (family, quant) -> span over SPAN."""
    loaded: dict[tuple[str, str], SpanModel] = {}

    def get(family: str, quant: str = "none") -> SpanModel:
        if (family, quant) not in loaded:
            loaded[family, quant] = load_span(checkpoint_factory(family), *SPAN, quant=quant)
        return loaded[family, quant]

    return get


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_batch_is_bit_identical_to_one_by_one(spans, family, quant):
    torch.manual_seed(0)
    for ours, ref, caches, ref_caches in run_steps(spans(family, quant)):
        assert all(torch.equal(a, b) for a, b in zip(ours, ref))
        assert all(same_cache_state(cache_state(a), cache_state(b)) for a, b in zip(caches, ref_caches))
    assert [cache.length for cache in caches] == [3 + 3, 7 + 6, 5 + 4, 0 + 8, 11 + 5]


def test_int8_batch_beyond_the_kernel_rows_is_still_bit_identical(spans):
    # 64 + 3 + 40 + 2 + 1 rows: more than the packed int8 kernel takes, and items bigger than it
    sessions = [(1, 6, 4, 2), (1, 6, 3, 5), (2, 5, 8, 1), (1, 6, 2, 9), (1, 6, 1, 4)]
    steps = [(16, 1, 5, 1, 1), (1, 1, 1, 1, 1)]
    for ours, ref, _, _ in run_steps(spans("llama", "int8"), steps, sessions):
        assert all(torch.equal(a, b) for a, b in zip(ours, ref))


# Decoding sessions of 7 rows in all (a pass the compiled step takes), over different blocks.
DECODERS = [(1, 2, 1, 3), (2, 6, 2, 7), (1, 6, 1, 5), (1, 6, 1, 0), (3, 5, 2, 11)]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_pass_of_up_to_8_rows_is_one_compiled_call_with_the_modules_bits(spans, monkeypatch, family, quant):
    # mistral: one kv head for four query heads and a sliding window of 5 (crossed here); qwen2: qkv
    # bias; the sessions run different blocks, so most blocks see only some of them
    span = spans(family, quant)
    steps = [(1, 1, 1, 1, 1), (2, 1, 1, 1, 1), (1, 1, 1, 2, 1), *[(1, 1, 1, 1, 1)] * 3]
    calls = []
    real = block_step.run
    with monkeypatch.context() as patch:
        patch.setattr(block_step, "run", lambda weights, segments, **k: calls.append(len(segments))
                      or real(weights, segments, **k))
        compiled = list(run_steps(span, steps, DECODERS))
    assert calls.count(len(DECODERS)) == len(steps)  # each pass one call (and each session alone one)
    with monkeypatch.context() as patch:
        patch.setattr(SpanModel, "compiled_blocks", lambda self, *a: None)
        modules = list(run_steps(span, steps, DECODERS))
    for (ours, alone, caches, alone_caches), (theirs, _, ref_caches, _) in zip(compiled, modules):
        assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(ours, theirs, alone))
        assert all(same_cache_state(cache_state(a), cache_state(b)) and same_cache_state(cache_state(a), cache_state(c))
                   for a, b, c in zip(caches, ref_caches, alone_caches))
    assert [cache.length for cache in caches] == [3 + 7, 7 + 6, 5 + 6, 0 + 7, 11 + 6]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_fp32_batch_matches_one_by_one_to_rounding(spans, family):
    # mistral: one kv head for four query heads and a sliding window of 5; qwen2: qkv bias
    for ours, ref, caches, ref_caches in run_steps(spans(family)):
        assert all(a.shape == b.shape for a, b in zip(ours, ref))
        assert max((a - b).abs().max().item() for a, b in zip(ours, ref)) <= 1e-5
        assert all(a.length == b.length for a, b in zip(caches, ref_caches))
        assert max((a.keys - b.keys).abs().max().item() for a, b in zip(caches, ref_caches)) <= 1e-5
    assert min(a.abs().max().item() for a in ours) > 0.5, "outputs too small for the comparison to mean much"


def test_an_empty_batch_returns_nothing(spans):
    assert forward_batch(spans("llama"), []) == []


def test_a_single_item_gives_the_span_forward_bit_for_bit(spans):
    span = spans("llama")
    (start, end, cache), = open_sessions(span, [(1, 6, 2, 4)])
    twin = copy.deepcopy(cache)
    hidden = torch.randn(2, 3, span.config.hidden_size, generator=torch.Generator().manual_seed(2))
    ours, = forward_batch(span, [BatchItem(hidden, cache, start, end)])
    assert torch.equal(ours, span(hidden, twin))


def _bad_items(span: SpanModel, caches: list[tuple[int, int, KVCache]]) -> dict[str, tuple[BatchItem, type]]:
    """One bad item of each kind, with the error it must raise; `caches` are the good sessions'."""
    D = span.config.hidden_size
    full_start, full_end, full_cache = caches[2]  # a session over the whole span, batch 2
    full = span.new_cache(1, 4)
    span(torch.zeros(1, 4, D), full)
    return {
        "hidden width": (BatchItem(torch.zeros(2, 1, D + 1), full_cache, full_start, full_end), InvalidInput),
        "no tokens": (BatchItem(torch.zeros(2, 0, D), full_cache, full_start, full_end), InvalidInput),
        "integer hidden": (BatchItem(torch.zeros(2, 1, D).long(), full_cache, full_start, full_end),
                           InvalidInput),
        "batch mismatch": (BatchItem(torch.zeros(3, 1, D), full_cache, full_start, full_end), InvalidInput),
        "before the span": (BatchItem(torch.zeros(1, 1, D), span.new_cache(1, 8), 0, 5), SpanOutOfRange),
        "past the span": (BatchItem(torch.zeros(1, 1, D), span.new_cache(1, 8), 2, 7), SpanOutOfRange),
        "empty range": (BatchItem(torch.zeros(1, 1, D), span.new_cache(1, 8), 3, 3), SpanOutOfRange),
        "layer count": (BatchItem(torch.zeros(1, 1, D), span.new_cache(1, 8), 2, 4), InvalidInput),
        "cache full": (BatchItem(torch.zeros(1, 1, D), full, *SPAN), CacheFull),
        "shared cache": (BatchItem(torch.zeros(2, 1, D), full_cache, full_start, full_end), InvalidInput),
    }


BAD = ["hidden width", "no tokens", "integer hidden", "batch mismatch", "before the span", "past the span",
       "empty range", "layer count", "cache full", "shared cache"]


@pytest.mark.parametrize("bad", BAD)
def test_a_bad_item_raises_its_typed_error_and_no_cache_moves(spans, bad):
    span = spans("llama", "int8")
    sessions = open_sessions(span)
    untouched = copy.deepcopy(sessions)
    generator = torch.Generator().manual_seed(3)
    hiddens = [hidden_for(span, cache.batch, 1, generator) for _, _, cache in sessions]
    bad_item, error = _bad_items(span, sessions)[bad]
    before = [cache_state(cache) for _, _, cache in sessions] + [cache_state(bad_item.cache)]
    with pytest.raises(error):
        forward_batch(span, [BatchItem(h, c, s, e) for h, (s, e, c) in zip(hiddens, sessions)] + [bad_item])
    after = [cache_state(cache) for _, _, cache in sessions] + [cache_state(bad_item.cache)]
    assert all(same_cache_state(a, b) for a, b in zip(before, after))
    ours = forward_batch(span, [BatchItem(h, c, s, e) for h, (s, e, c) in zip(hiddens, sessions)])
    ref = forward_batch(span, [BatchItem(h, c, s, e) for h, (s, e, c) in zip(hiddens, untouched)])
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))


def test_the_bad_item_error_names_the_problem(spans):
    span = spans("llama")
    sessions = open_sessions(span)
    bad = _bad_items(span, sessions)
    with pytest.raises(InvalidInput, match="5 layers sent to run blocks \\[2, 4\\)"):
        forward_batch(span, [bad["layer count"][0]])
    with pytest.raises(InvalidInput, match="share one KV cache"):
        forward_batch(span, [BatchItem(torch.zeros(2, 1, span.config.hidden_size), sessions[2][2], *SPAN),
                             bad["shared cache"][0]])
