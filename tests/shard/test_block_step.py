"""shard.block_step: a span's step in one compiled call gives the module path's bits, outputs and
cache alike, wherever it runs; the modules run wherever it cannot."""

from __future__ import annotations

import pytest
import torch

from shard import block_step, qkernels
from shard.errors import QuantizationError
from shard.span import SpanModel, load_span

pytestmark = pytest.mark.skipif(not qkernels.available(), reason=f"no compiled kernels: {qkernels.why_unavailable()}")

SPAN = (1, 6)


@pytest.fixture(scope="module")
def spans(checkpoint_factory):
    loaded: dict[tuple, SpanModel] = {}

    def get(family: str, quant: str, group_size: int = 32) -> SpanModel:
        key = (family, quant, group_size)
        if key not in loaded:
            sizes = {} if group_size == 32 else {"intermediate_size": 192}  # in_features divisible by the group
            loaded[key] = load_span(checkpoint_factory(family, **sizes), *SPAN, quant=quant, group_size=group_size)
        return loaded[key]

    return get


def run(span: SpanModel, steps: list[tuple[int, int]], *, compiled: bool, monkeypatch) -> tuple[list, object]:
    """The outputs of `steps` ((batch, tokens) each, one session) and the cache after them, with the
    compiled step on or off; counts the compiled calls."""
    calls = []
    real = block_step.step
    with monkeypatch.context() as patch:
        if compiled:
            patch.setattr(block_step, "step", lambda *a, **k: calls.append(1) or real(*a, **k))
        else:
            patch.setattr(SpanModel, "compiled_blocks", lambda self, *a: None)
        generator = torch.Generator().manual_seed(7)
        cache = span.new_cache(steps[0][0], 48)
        outputs = [span(torch.randn(batch, tokens, span.config.hidden_size, generator=generator), cache)
                   for batch, tokens in steps]
    return outputs, cache, len(calls)


@pytest.mark.parametrize("family,quant,group", [
    (family, quant, group) for family in ("llama", "llama3", "mistral", "qwen2")
    for quant, group in (("int8", 32), ("int4", 32), ("int4", 64))
    if (family, group) != ("llama3", 64)])  # llama3's 4 heads of 24: o_proj's 96 inputs are not groups of 64
@pytest.mark.parametrize("batch", [1, 2])
def test_the_compiled_step_gives_the_modules_bits(spans, monkeypatch, family, quant, group, batch):
    # mistral: one kv head for four query heads and a sliding window of 5 (crossed by the steps);
    # qwen2: biases on q, k and v; llama3: a head_dim of 24; prompts of up to 8 rows, then decoding
    span = spans(family, quant, group)
    steps = [(batch, 8 // batch), *[(batch, 1)] * 5, (batch, 3 // batch), (batch, 1)]
    ours, cache, calls = run(span, steps, compiled=True, monkeypatch=monkeypatch)
    theirs, ref_cache, _ = run(span, steps, compiled=False, monkeypatch=monkeypatch)
    assert calls == len(steps)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert cache.length == ref_cache.length
    assert torch.equal(cache.keys, ref_cache.keys) and torch.equal(cache.values, ref_cache.values)


def test_a_long_prompt_float_spans_and_switched_off_kernels_take_the_modules(spans, monkeypatch):
    _, _, calls = run(spans("llama", "int8"), [(1, block_step.MAX_ROWS + 1), (1, 1)], compiled=True,
                      monkeypatch=monkeypatch)
    assert calls == 1  # the prompt's 9 rows ran on the modules, the decode step compiled
    _, _, calls = run(spans("llama", "none"), [(1, 3), (1, 1)], compiled=True, monkeypatch=monkeypatch)
    assert calls == 0
    monkeypatch.setattr("shard.quant._has_compiled", lambda: False)
    _, _, calls = run(spans("llama", "int4"), [(1, 3), (1, 1)], compiled=True, monkeypatch=monkeypatch)
    assert calls == 0


def test_a_step_that_does_not_fit_is_refused_before_any_cache_moves(spans):
    span = spans("llama", "int8")
    weights = [block_step.weights_of(block) for block in span.blocks]
    config, cache = span.config, span.new_cache(1, 4)
    cos = sin = torch.zeros(1, config.head_dim)
    shape = dict(heads=config.num_heads, kv_heads=config.num_kv_heads, head_dim=config.head_dim, window=None)
    hidden = torch.randn(1, 1, config.hidden_size)
    for bad, message in [
        (dict(hidden=torch.randn(2, 1, config.hidden_size)), "over a cache"),  # two sequences, a cache of one
        (dict(weights=weights[:2]), "over a cache"),  # fewer blocks than the cache's layers
        (dict(cos=torch.zeros(2, config.head_dim)), "rotary table"),
        (dict(shape=dict(shape, heads=config.num_heads * 2)), "does not fit"),
    ]:
        args = dict(weights=weights, hidden=hidden, cos=cos, sin=sin, shape=shape) | bad
        with pytest.raises(QuantizationError, match=message):
            block_step.step(args["weights"], args["hidden"], cache, args["cos"], args["sin"], **args["shape"])
    cache.length = 4  # full
    with pytest.raises(QuantizationError, match="at length 4"):
        block_step.step(weights, hidden, cache, cos, sin, **shape)
    assert not cache.keys.any() and not cache.values.any()


def test_a_pass_that_does_not_fit_is_refused_before_any_cache_moves(spans):
    span = spans("llama", "int8")
    weights = [block_step.weights_of(block) for block in span.blocks]
    config = span.config
    shape = dict(heads=config.num_heads, kv_heads=config.num_kv_heads, head_dim=config.head_dim, window=None)
    cos = sin = torch.zeros(1, config.head_dim)

    def segment(batch: int, first: int = 0, last: int | None = None, layers: int | None = None):
        """A decode step of `batch` sequences through blocks [first, last), over a cache of `layers`
        layers (by default as many as it runs)."""
        if layers is None:
            layers = (len(weights) if last is None else last) - first
        cache = span.new_cache(batch, 4)
        cache.keys, cache.values = cache.keys[:layers].contiguous(), cache.values[:layers].contiguous()
        return block_step.Segment(torch.randn(batch, 1, config.hidden_size), cache, cos, sin, first, last)

    for segments, message in [
        ([segment(4), segment(4), segment(1)], "9 rows, at most 8"),
        ([segment(1), segment(1, 2, len(weights) + 1)], r"through blocks \[2, 6\) of 5"),
        ([segment(1, 3, 3, layers=1)], r"through blocks \[3, 3\) of 5"),
        ([segment(1, 0, 2), segment(1, 1, 4, layers=2)], r"\(2, 1, 2, 4, 16\) at length 0, through blocks \[1, 4\)"),
    ]:
        with pytest.raises(QuantizationError, match=message):
            block_step.run(weights, segments, **shape)
        assert not any(s.cache.keys.any() or s.cache.values.any() for s in segments)
    with pytest.raises(QuantizationError, match="0 segments"):
        block_step.run(weights, [], **shape)
