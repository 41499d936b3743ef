"""Every span and head behind `shard.interfaces` behaves alike: the real ones and the simulator's.

A conformance suite (as tests/mesh/test_transport_conformance.py is for transports): what the node
and the client rely on, checked on `SpanModel`, the simulator's `CostModelSpan` and `TimedSpan`,
and on `ClientHead` and `StandInHead`, in numpy arrays only.
"""

from __future__ import annotations

import numpy as np
import pytest

from shard.config import config_from_dict
from shard.errors import CacheFull, InvalidInput, ShardError
from shard.head import load_head
from shard.interfaces import BatchStep, Cache, Head, Span
from shard.span import load_span
from simulations.compute import CostModelSpan, StandInHead, StandInWeights, TimedSpan
from simulations.scenario import DeviceProfile, ModelShape

SHAPE = ModelShape(blocks=6, stand_in_hidden=64, vocab=97)
STAND_IN_CONFIG = config_from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 97, "hidden_size": 64,
                                    "intermediate_size": 128, "num_hidden_layers": 6, "num_attention_heads": 1,
                                    "max_position_embeddings": 256})
STAND_IN_WEIGHTS = StandInWeights(SHAPE)
DEVICE = DeviceProfile(block_ms=10.0, prefill_factor=0.5)


@pytest.fixture(scope="module", params=["int8", "none", "cost model", "timed int4"])
def span(request, checkpoint_factory) -> Span:
    """Blocks [1, 6) of a six-block model, as each implementation serves them."""
    if request.param == "cost model":
        return CostModelSpan(SHAPE, STAND_IN_CONFIG, STAND_IN_WEIGHTS, DEVICE, 1, 6)
    model_dir = checkpoint_factory("llama")
    if request.param == "timed int4":
        return TimedSpan(load_span(model_dir, 1, 6, quant="int4"), DEVICE)
    return load_span(model_dir, 1, 6, quant=request.param)


@pytest.fixture(scope="module", params=["int8", "none", "stand-in"])
def head(request, checkpoint_factory) -> Head:
    if request.param == "stand-in":
        return StandInHead(STAND_IN_CONFIG, STAND_IN_WEIGHTS)
    return load_head(checkpoint_factory("llama"), quant=request.param)


def hidden(span: Span, batch: int, tokens: int, seed: int) -> np.ndarray:
    """Inputs each implementation computes on: integers below 97 in the stand-in's live channel."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 97, size=(batch, tokens, span.config.hidden_size)).astype(np.float32) / 97


def test_spans_declare_the_interface(span):
    assert isinstance(span, Span) and isinstance(span.new_cache(1, 8), Cache)
    assert span.batch_rows == (1 if span.quant == "none" else 32)
    assert (span.start, span.end) == (1, 6) and span.sub_span(2, 4).end == 4


def test_run_returns_float32_and_advances_the_cache(span):
    cache = span.new_cache(2, 16)
    out = span.run(hidden(span, 2, 5, 0), cache)
    assert out.shape == (2, 5, span.config.hidden_size) and out.dtype == np.float32 and cache.length == 5
    assert cache.nbytes == span.cache_bytes(2, 16)


def test_passes_and_a_redone_step_give_the_same_outputs(span):
    inputs = hidden(span, 1, 6, 1)
    whole, parts = span.new_cache(1, 16), span.new_cache(1, 16)
    at_once = span.run(inputs, whole)
    in_passes = span.run(inputs, parts, (2, 3, 1))
    assert parts.length == whole.length == 6
    np.testing.assert_allclose(in_passes, at_once, rtol=1e-4, atol=1e-4)
    step = hidden(span, 1, 1, 2)
    first = span.run(step, whole)
    whole.truncate(6)  # the client redoes a step whose result it lost
    assert np.array_equal(span.run(step, whole), first) and whole.length == 7


def test_a_batched_pass_gives_each_step_what_it_gets_alone(span):
    ranges = [(1, 6), (2, 4), (1, 6)]
    alone, together = [], []
    for cache_list in (alone, together):
        for start, end in ranges:
            view = span.sub_span(start, end)
            cache = view.new_cache(1, 16)
            view.run(hidden(span, 1, 3, start), cache)
            cache_list.append((start, end, cache))
    steps = [hidden(span, 1, 1, 10 + i) for i in range(len(ranges))]
    expected = [span.sub_span(s, e).run(x, c) for x, (s, e, c) in zip(steps, alone)]
    outputs = span.run_batch([BatchStep(x, c, s, e) for x, (s, e, c) in zip(steps, together)])
    for ours, ref in zip(outputs, expected):
        if span.batch_rows > 1:
            assert np.array_equal(ours, ref)  # row-exact: bit for bit
        else:
            np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_bad_input_is_a_shard_error_and_leaves_the_cache_alone(span):
    cache = span.new_cache(1, 4)
    span.run(hidden(span, 1, 3, 0), cache)
    with pytest.raises(InvalidInput):
        span.run(np.zeros((1, 1, span.config.hidden_size + 1), dtype=np.float32), cache)
    with pytest.raises(InvalidInput):
        span.run(np.zeros((2, 1, span.config.hidden_size), dtype=np.float32), cache)  # batch of a batch-1 session
    with pytest.raises(CacheFull):
        span.run(hidden(span, 1, 2, 0), cache)
    assert cache.length == 3
    good = span.new_cache(1, 8)
    outputs = span.run_batch([BatchStep(hidden(span, 1, 1, 0), good, 1, 6), BatchStep(hidden(span, 1, 2, 0), cache, 1, 6)])
    assert isinstance(outputs[1], ShardError) and isinstance(outputs[0], np.ndarray)
    assert (good.length, cache.length) == (1, 3)


def test_modelled_seconds_are_the_simulator_s_alone(span):
    expected = 0.0 if type(span).__name__ == "SpanModel" else 5 * DEVICE.block_ms / 1000
    assert span.modelled_seconds(1, 1) == pytest.approx(expected)


def test_heads_declare_the_interface_and_batch_rows_exactly(head):
    assert isinstance(head, Head)
    ids = [3, 5, 7]
    hidden_states = head.embed_tokens(ids)
    assert hidden_states.shape == (1, 3, head.config.hidden_size) and hidden_states.dtype == np.float32
    rows = np.concatenate([hidden_states[0], hidden_states[0][::-1]])  # six rows of last states
    together = head.next_logits(rows)
    assert together.shape == (6, head.config.vocab_size) and together.dtype == np.float32
    alone = np.concatenate([head.next_logits(rows[i:i + 1]) for i in range(6)])
    if head.batch_rows > 1:
        assert np.array_equal(together, alone)
    else:
        np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4)


def test_heads_refuse_ids_outside_the_vocabulary(checkpoint_factory):
    head = load_head(checkpoint_factory("llama"))
    with pytest.raises(InvalidInput, match="outside the vocabulary"):
        head.embed_tokens([1, head.config.vocab_size])
    with pytest.raises(InvalidInput):
        head.next_logits(np.zeros((1, 1, head.config.hidden_size), dtype=np.float32))
