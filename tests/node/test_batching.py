"""Batching on a node: concurrent sessions' decode steps share one forward pass, with the results
each session would get alone; prefill runs in turns so it does not stall other sessions' decoding."""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing

from node.sessions import SessionLimits, SessionManager, SessionRefused, prefill_turns
from protocol import ErrorCode
from shard.span import load_span

HIDDEN = 64


@pytest.fixture(scope="module")
def int8_span(checkpoint_factory):
    return load_span(checkpoint_factory("llama"), 0, 6, quant="int8")


def manager_for(span, **limits) -> SessionManager:
    return SessionManager(span, SessionLimits(max_length=64, **limits))


def inputs(seed: int, tokens: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, tokens, HIDDEN)).astype(np.float32)


async def run_sessions(manager: SessionManager, prompts: list[int], rounds: int, ranges=None) -> list[list[np.ndarray]]:
    """Open one session per prompt length (on `ranges` of blocks), prefill it, then decode `rounds`
    steps in every session at once; each session's outputs in order."""
    ranges = ranges or [(0, 6)] * len(prompts)
    sessions = [manager.open(f"s{i}", "peer", a, b, 64, 1) for i, (a, b) in enumerate(ranges)]
    outputs = [[] for _ in sessions]
    for i, (session, length) in enumerate(zip(sessions, prompts)):
        outputs[i].append((await manager.step(session, inputs(i, length), 0))[0])

    async def decode(i: int, position: int, step: int) -> None:
        outputs[i].append((await manager.step(sessions[i], inputs(100 * i + step, 1), position))[0])

    for step in range(rounds):
        async with trio.open_nursery() as nursery:
            for i, length in enumerate(prompts):
                nursery.start_soon(decode, i, length + step, step)
    return outputs


@pytest.mark.parametrize("in_thread", [False, True])
async def test_concurrent_decode_steps_run_as_one_pass_with_the_results_of_running_alone(int8_span, in_thread):
    prompts, ranges = [10, 9, 12, 15], [(0, 6), (0, 6), (2, 5), (0, 3)]
    batched = manager_for(int8_span, compute_in_thread=in_thread, inline_max_batch_rows=2)
    together = await run_sessions(batched, prompts, rounds=3, ranges=ranges)
    assert (batched.batches, batched.batched_steps) == (3, 12)  # every round in one pass
    alone = []
    for i, (length, blocks) in enumerate(zip(prompts, ranges)):  # the same steps, one session at a time
        solo = manager_for(int8_span)
        session = solo.open("s", "peer", *blocks, 64, 1)
        outputs = [(await solo.step(session, inputs(i, length), 0))[0]]
        for step in range(3):
            outputs.append((await solo.step(session, inputs(100 * i + step, 1), length + step))[0])
        alone.append(outputs)
    for ours, reference in zip(together, alone):
        for got, want in zip(ours, reference, strict=True):
            assert np.array_equal(got, want)  # int8 kernels are row-exact: batching changes nothing


async def test_a_batch_takes_at_most_max_batch_rows(int8_span):
    manager = manager_for(int8_span, compute_in_thread=False, max_batch_rows=3)
    await run_sessions(manager, [9, 10, 11, 12, 13, 14, 15], rounds=1)
    assert (manager.batches, manager.batched_steps) == (3, 7)  # 3 + 3 + 1


async def test_a_step_the_batch_cannot_take_fails_alone(int8_span):
    manager = manager_for(int8_span, compute_in_thread=False)
    full = manager.open("full", "peer", 0, 6, 2, 1)
    await manager.step(full, inputs(0, 2), 0)  # its cache holds 2 of 2 positions
    fine = manager.open("fine", "peer", 0, 6, 64, 1)
    await manager.step(fine, inputs(1, 3), 0)
    results = {}

    async def decode(name, session, position):
        try:
            results[name] = (await manager.step(session, inputs(7, 1), position))[0]
        except SessionRefused as err:
            results[name] = err

    async with trio.open_nursery() as nursery:
        nursery.start_soon(decode, "full", full, 2)
        nursery.start_soon(decode, "fine", fine, 3)
    # refused on its shape before it joins a batch (SessionManager.check_input), the other served
    assert isinstance(results["full"], SessionRefused) and results["full"].code == ErrorCode.CACHE_FULL
    assert "overflow the session's 2 positions" in results["full"].reason
    assert results["fine"].shape == (1, 1, HIDDEN) and fine.cache.length == 4 and full.cache.length == 2


async def test_a_long_prefill_yields_to_decode_steps_between_its_chunks(int8_span):
    manager = manager_for(int8_span, prefill_chunk_tokens=4)  # prefill in the worker thread, as on a node
    decoding = manager.open("decoding", "peer", 0, 6, 64, 1)
    await manager.step(decoding, inputs(0, 3), 0)
    prompt = manager.open("prompt", "peer", 0, 6, 64, 1)
    finished = []

    async def prefill():
        await manager.step(prompt, inputs(1, 40), 0)
        finished.append("prefill")

    async def decode():
        for position in (3, 4, 5):
            await manager.step(decoding, inputs(position, 1), position)
        finished.append("decode")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(prefill)
        await trio.testing.wait_all_tasks_blocked()  # its first chunk is running in the thread
        nursery.start_soon(decode)
    assert finished == ["decode", "prefill"]  # three decode steps went between the prompt's ten chunks
    assert prompt.cache.length == 40


async def test_prefill_in_chunks_equals_prefill_in_one_pass_per_chunk(int8_span):
    """Prefill runs as turns of whole passes; a replay with the original steps as chunks repeats them."""
    chunked = manager_for(int8_span, compute_in_thread=False, prefill_chunk_tokens=4)
    session = chunked.open("s", "peer", 0, 6, 64, 1)
    original = [(await chunked.step(session, inputs(0, 10), 0))[0]]
    for position in (10, 11):
        original.append((await chunked.step(session, inputs(position, 1), position))[0])
    replayed = manager_for(int8_span, compute_in_thread=False, prefill_chunk_tokens=4)
    again = replayed.open("s", "peer", 0, 6, 64, 1)
    history = np.concatenate([inputs(0, 10), inputs(10, 1), inputs(11, 1)], axis=1)
    output, _ = await replayed.step(again, history, 0, (10, 1, 1))
    assert np.array_equal(output, np.concatenate(original, axis=1))


@pytest.mark.parametrize("chunks, limit, turns", [
    ((300,), 128, [(128,), (128,), (44,)]),
    ((1, 1, 1), 128, [(1, 1, 1)]),
    ((100, 50, 1), 128, [(100,), (50, 1)]),
    ((4, 4, 4), 8, [(4, 4), (4,)]),
    ((9,), 4, [(4,), (4,), (1,)]),
])
def test_prefill_turns(chunks, limit, turns):
    assert prefill_turns(chunks, limit) == turns
    assert sum(sum(turn) for turn in turns) == sum(chunks)


async def test_an_unquantized_span_runs_decode_steps_one_at_a_time(checkpoint_factory):
    """fp32 rows round differently in a batch; exact replay after failover matters more here."""
    manager = manager_for(load_span(checkpoint_factory("llama"), 0, 6), compute_in_thread=False)
    await run_sessions(manager, [9, 10, 11], rounds=2)
    assert (manager.batches, manager.batched_steps) == (6, 6)
