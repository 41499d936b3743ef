"""The cost model: stand-in activations that are exact under any split, chunking or replay."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from shard.config import config_from_dict
from simulations.compute import (
    LIVE, PYTHON_MAX_TOKENS, CostModelSpan, StandInHead, StandInWeights, VirtualCache, blocks_that_fit, kv_bytes,
    reference_tokens, step_seconds,
)
from simulations.scenario import DEFAULT_DEVICES, DeviceProfile, ModelShape

SHAPE = ModelShape(blocks=12, stand_in_hidden=64, vocab=97)
CONFIG = config_from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 97, "hidden_size": 64,
                           "intermediate_size": 128, "num_hidden_layers": 12, "num_attention_heads": 1,
                           "max_position_embeddings": 256})
WEIGHTS = StandInWeights(SHAPE)
LAPTOP = DEFAULT_DEVICES["laptop"]


def generate(splits: list[tuple[int, int]], prompt: list[int], new_tokens: int, *, prefill_chunk: int = 0) -> list[int]:
    """Greedy tokens through CostModelSpans split at `splits`, as a client would drive them."""
    head = StandInHead(CONFIG, WEIGHTS)
    spans = [CostModelSpan(SHAPE, CONFIG, WEIGHTS, LAPTOP, start, end) for start, end in splits]
    caches = [span.new_cache(1, 200) for span in spans]
    chunks = [prompt[i:i + prefill_chunk] for i in range(0, len(prompt), prefill_chunk)] if prefill_chunk else [prompt]
    tokens: list[int] = []
    while len(tokens) < new_tokens:
        for chunk in chunks:
            hidden = head.embed_tokens(chunk)
            for span, cache in zip(spans, caches):
                hidden = span.run(hidden, cache)
        tokens.append(int(head.next_logits(hidden[:, -1])[0].argmax()))
        chunks = [[tokens[-1]]]
    return tokens


PROMPT = [5, 17, 33, 2, 9, 71, 4, 60]


def test_any_split_and_chunking_gives_the_reference_tokens():
    expected = reference_tokens(WEIGHTS, 12, PROMPT, 10)
    assert generate([(0, 12)], PROMPT, 10) == expected
    assert generate([(0, 3), (3, 4), (4, 12)], PROMPT, 10) == expected
    assert generate([(0, 6), (6, 12)], PROMPT, 10, prefill_chunk=3) == expected
    assert len(set(expected)) > 3  # not a constant stream


def test_a_lost_position_changes_the_tokens():
    assert reference_tokens(WEIGHTS, 12, PROMPT[:-1], 10) != reference_tokens(WEIGHTS, 12, PROMPT, 10)
    assert reference_tokens(WEIGHTS, 12, [PROMPT[0]] + PROMPT, 10) != reference_tokens(WEIGHTS, 12, PROMPT, 10)


def test_the_decode_fast_path_matches_the_array_path():
    live = np.array(WEIGHTS.embed[[3]][None], dtype=np.float64)  # [1, 1, LIVE]
    state_a, state_b = np.full((12, 1), 1234.0), [1234.0] * 12
    for block in range(12):
        live = WEIGHTS.block(block, live, state_a[block], 41)
    fast = WEIGHTS.blocks_one_position(0, WEIGHTS.embed[3].tolist(), state_b, 41)
    assert fast == live[0, 0].tolist() and state_b == state_a[:, 0].tolist()


def test_array_and_python_paths_agree_on_long_prefills():
    """Past PYTHON_MAX_TOKENS positions (or batches) a span computes with arrays: same integers."""
    span, head = CostModelSpan(SHAPE, CONFIG, WEIGHTS, LAPTOP, 0, 12), StandInHead(CONFIG, WEIGHTS)
    prompt = [(7 * i + 3) % 97 for i in range(PYTHON_MAX_TOKENS + 40)]
    whole, pieces = span.new_cache(1, 400), span.new_cache(1, 400)
    at_once = span.run(head.embed_tokens(prompt), whole)  # the array path
    in_chunks = np.concatenate([span.run(head.embed_tokens(prompt[i:i + 50]), pieces)  # the Python path
                                for i in range(0, len(prompt), 50)], axis=1)
    assert np.array_equal(at_once, in_chunks) and np.array_equal(whole.state, pieces.state)
    assert int(head.next_logits(at_once[:, -1])[0].argmax()) == reference_tokens(WEIGHTS, 12, prompt, 1)[0]


def test_a_truncated_cache_redoes_a_step_identically():
    span = CostModelSpan(SHAPE, CONFIG, WEIGHTS, LAPTOP, 0, 12)
    cache = span.new_cache(1, 64)
    span.run(StandInHead(CONFIG, WEIGHTS).embed_tokens(PROMPT), cache)
    step = StandInHead(CONFIG, WEIGHTS).embed_tokens([7])
    first = span.run(step.copy(), cache)
    cache.truncate(len(PROMPT))
    assert np.array_equal(span.run(step.copy(), cache), first) and cache.length == len(PROMPT) + 1


@pytest.mark.parametrize("batch", [1, 2])  # one sequence: the Python path; two: the array path
def test_a_rewind_inside_a_short_step_leaves_no_trace_of_the_rejected_positions(batch):
    """Speculation: a 6-token step, cut back to 3 of its positions, then more steps: the same bits as
    a cache that only ever saw the kept positions."""
    head, spans = StandInHead(CONFIG, WEIGHTS), [CostModelSpan(SHAPE, CONFIG, WEIGHTS, LAPTOP, 0, 5),
                                                 CostModelSpan(SHAPE, CONFIG, WEIGHTS, LAPTOP, 5, 12)]

    def embed(ids: list[int]) -> np.ndarray:
        return np.repeat(head.embed_tokens(ids), batch, axis=0)

    def run(hidden: np.ndarray, caches: list[VirtualCache]) -> np.ndarray:
        for span, cache in zip(spans, caches):
            hidden = span.run(hidden, cache)
        return hidden

    spoken, fresh = [span.new_cache(batch, 64) for span in spans], [span.new_cache(batch, 64) for span in spans]
    prompt = PROMPT * 3  # a prefill longer than ROW_EXACT_TOKENS
    run(embed(prompt), spoken)
    run(embed(prompt), fresh)
    drafted = run(embed([7, 11, 13, 40, 41, 42]), spoken)  # the last token and 5 drafts; 2 are kept
    for cache in spoken:
        cache.truncate(len(prompt) + 3)
    kept = run(embed([7, 11, 13]), fresh)
    assert np.array_equal(drafted[:, :3], kept)
    for ids in ([50], [51, 52, 53], [54]):  # later steps: decode and another short one
        assert np.array_equal(run(embed(ids), spoken), run(embed(ids), fresh))
    assert [c.length for c in spoken] == [c.length for c in fresh] == [len(prompt) + 8] * 2
    with pytest.raises(ValueError):  # inside a long step (a prefill), only its boundaries are kept
        spoken[0].truncate(len(prompt) - 2)


def test_the_cache_budget_is_the_real_model_s():
    span = CostModelSpan(SHAPE, CONFIG, WEIGHTS, LAPTOP, 2, 6)
    cache = span.new_cache(1, 100)
    assert cache.nbytes == span.cache_bytes(1, 100) == kv_bytes(SHAPE, 4, 1, 100)
    assert kv_bytes(SHAPE, 1, 1, 1) == 2 * SHAPE.kv_heads * SHAPE.head_dim * 2
    assert span.sub_span(3, 5).cache_bytes(1, 100) == kv_bytes(SHAPE, 2, 1, 100)
    with pytest.raises(Exception, match="CacheFull|cache|positions|exceed"):
        VirtualCache(1, 1, 2, 0).check_room(3)


def test_compute_time_follows_the_device_profile():
    device = DeviceProfile(block_ms=10.0, prefill_factor=0.5)
    assert step_seconds(device, 4, 1) == pytest.approx(0.04)
    assert step_seconds(device, 4, 9) == pytest.approx(0.04 * 5)
    assert blocks_that_fit(DeviceProfile(weights_gb=1.0), ModelShape(block_params=0.3e9)) == 3
    assert blocks_that_fit(DeviceProfile(weights_gb=100.0), ModelShape(blocks=40)) == 40


async def test_modelled_compute_takes_virtual_time(autojump_clock):
    from node.sessions import _modelled_compute

    span = CostModelSpan(SHAPE, CONFIG, WEIGHTS, DeviceProfile(block_ms=20.0), 0, 5)
    assert span.modelled_seconds(1, 1) == pytest.approx(0.1)
    started = trio.current_time()
    await _modelled_compute(span, 1, (1,))
    assert trio.current_time() - started == pytest.approx(0.1)


def test_the_stand_in_head_round_trips_live_channels_only():
    hidden = StandInHead(CONFIG, WEIGHTS).embed_tokens([1, 2])
    assert hidden.shape == (1, 2, 64) and np.count_nonzero(hidden[..., LIVE:]) == 0


async def test_the_node_waits_one_forward_pass_per_replayed_chunk(autojump_clock):
    from node.sessions import SessionLimits, SessionManager

    span = CostModelSpan(SHAPE, CONFIG, WEIGHTS, DeviceProfile(block_ms=10.0, prefill_factor=0.5), 0, 4)
    manager = SessionManager(span, SessionLimits(compute_in_thread=False))
    session = manager.open("s", "client", 0, 4, 64, 1)
    hidden = StandInHead(CONFIG, WEIGHTS).embed_tokens([1, 2, 3, 4, 5])
    _, seconds = await manager.step(session, hidden, 0, (3, 1, 1))
    assert seconds == pytest.approx(0.04 * 2 + 0.04 + 0.04)
    assert manager.reserved_bytes == span.cache_bytes(1, 64) <= manager.limits.kv_cache_bytes
