"""Rebalancing nodes on the in-memory transport, in virtual time: a node moves where the swarm lacks
blocks; a move announces the new span before the old one goes; sessions on the old span finish
within the grace period or fail over with identical output."""

from __future__ import annotations

import pytest
import trio

from node.node import Node
from node.rebalance import BalanceSettings
from node.sessions import SessionLimits
from shard.sampling import SamplingParams
from shard.span import load_span
from tests.mesh.test_failover_memory import PROMPT, TOKENS, FaultySwarm, expected  # noqa: F401 - fixture

BLOCKS = 6


@pytest.fixture
async def swarm(checkpoint_factory):
    async with trio.open_nursery() as nursery:
        yield FaultySwarm(checkpoint_factory("llama"), nursery)
        nursery.cancel_scope.cancel()


async def add_balanced(swarm: FaultySwarm, name: str, start: int, end: int, **settings) -> Node:
    """A node that may move (as `hearth node` without --blocks), holding at most end - start blocks."""
    loads = []

    async def load(a: int, b: int):
        loads.append((a, b))
        return load_span(swarm.model_dir, a, b)

    transport = await swarm.nursery.start(swarm._transport, name)
    balance = BalanceSettings(BLOCKS, end - start, 0.001, **{"every_s": 60.0, **settings})
    node = Node(load_span(swarm.model_dir, start, end), "tiny", swarm.digest, wall_clock=trio.current_time,
                token_seconds=0.001 * (end - start), limits=SessionLimits(compute_in_thread=False),
                balance=balance, load_span=load, seed=name)
    node.loads = loads
    await swarm.nursery.start(node.run, transport, swarm.directory)
    swarm.nodes[name] = node
    return node


async def announced(swarm: FaultySwarm) -> dict[str, tuple[int, int]]:
    return {r.peer_id: (r.info.start, r.info.end) for r in await swarm.directory.lookup(swarm.digest)}


async def test_a_node_moves_into_the_blocks_nobody_serves(autojump_clock, swarm, expected):
    await swarm.add_node("a", 0, 3)
    mover = await add_balanced(swarm, "b", 0, 3)
    client = await swarm.client()
    # nobody serves [3, 6): the request waits (re-planning with backoff) until the node has moved there
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    assert report.token_ids == expected and [h["peer_id"] for h in report.route] == ["a", "b"]
    assert 30 <= trio.current_time() <= 60 * 1.5 + 30  # the first re-evaluation comes within every_s x (1 + jitter)
    assert mover.loads == [(3, 6)] and (await announced(swarm))["b"] == (3, 6)
    assert mover.rebalancer.moves == 1
    await trio.sleep(600)
    assert mover.rebalancer.moves == 1  # settled: the swarm has nowhere better for it


async def test_a_node_where_it_is_needed_stays(autojump_clock, swarm):
    await swarm.add_node("a", 0, 3)
    stayer = await add_balanced(swarm, "b", 3, 6)
    await trio.sleep(1200)
    assert stayer.loads == [] and (await announced(swarm))["b"] == (3, 6)


@pytest.mark.parametrize("grace_s, recoveries", [(600.0, 0), (0.0, 1)])
async def test_sessions_on_the_old_span_finish_within_the_grace_period_or_fail_over(
        autojump_clock, swarm, expected, grace_s, recoveries):
    await swarm.add_node("a", 0, 3)
    await swarm.add_node("spare", 3, 6, token_seconds=0.05)  # slower: the route goes through b first
    mover = await add_balanced(swarm, "b", 3, 6, grace_s=grace_s, every_s=1e6)
    original, calls = mover.manager.step, [0]

    async def step_then_move(session, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:  # mid-answer, the node moves to blocks [0, 3)
            swarm.nursery.start_soon(mover.move_to, 0, 3)
            await trio.sleep(0)
        return await original(session, *args, **kwargs)

    mover.manager.step = step_then_move
    client = await swarm.client()
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    assert report.token_ids == expected
    assert (await announced(swarm))["b"] == (0, 3)  # the new span is announced at once
    assert len(report.recoveries) == recoveries
    if recoveries:
        assert "moved to blocks [0, 3)" in report.recoveries[0].reason
        assert report.recoveries[0].replacements == ["spare"]
    await trio.sleep(grace_s + 5)
    assert not [s for s in mover.manager.sessions.values() if s.root is not mover.span]  # the old span let go


async def test_a_move_that_cannot_load_leaves_the_node_serving_its_old_blocks(autojump_clock, swarm, expected):
    await swarm.add_node("a", 0, 3)
    mover = await add_balanced(swarm, "b", 0, 3, settle_s=30.0)

    async def out_of_memory(a: int, b: int):
        raise MemoryError(f"cannot allocate blocks [{a}, {b})")

    mover.load_span = out_of_memory
    await trio.sleep(60 * 1.5 + 1)
    assert mover.rebalancer.failed_moves >= 1 and mover.rebalancer.moves == 0
    assert (await announced(swarm))["b"] == (0, 3)  # still announced, still serving
    await swarm.add_node("c", 3, 6)
    client = await swarm.client()
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    assert report.token_ids == expected
