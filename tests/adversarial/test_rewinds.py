"""A peer stepping its session back and forth (Step.rewind), on the in-memory transport in virtual time.

- A step that starts before the session's end without saying `rewind` is refused, naming why
  (POSITION_MISMATCH); a rewind cannot go forward either; the node serves an honest client after.
- Rewinds of more than 16 positions are prefill, paid from the peer's budget and refused past it;
  shorter ones (a token and its drafts) are not, as decode steps are not.
"""

from __future__ import annotations

import numpy as np
import pytest
import trio

from mesh.session import HopFailed
from node.sessions import SessionLimits, SessionManager, SessionRefused
from protocol import ErrorCode, Retry
from shard.interfaces import ROW_EXACT_TOKENS
from shard.span import load_span
from tests.adversarial.test_slot_hoarding import honest_tokens, open_session, peer
from tests.mesh.test_failover_memory import FaultySwarm, expected  # noqa: F401 - expected: a fixture

HIDDEN = 64  # the tiny model's


@pytest.fixture
async def swarm(checkpoint_factory):
    async with trio.open_nursery() as nursery:
        yield FaultySwarm(checkpoint_factory("llama"), nursery)
        nursery.cancel_scope.cancel()


def steps(tokens: int) -> np.ndarray:
    return np.ones((1, tokens, HIDDEN), np.float32)


async def test_a_step_that_goes_back_must_say_rewind(autojump_clock, checkpoint_factory):
    manager = SessionManager(load_span(checkpoint_factory("llama"), 0, 6), SessionLimits(compute_in_thread=False))
    session = manager.open("s", "mallory", 0, 6, 64, 1)
    await manager.step(session, steps(5), 0)
    with pytest.raises(SessionRefused) as refused:
        await manager.step(session, steps(1), 3)
    assert refused.value.code == ErrorCode.POSITION_MISMATCH
    assert "step starts at position 3 but the cache holds 5; a step that goes back must say rewind" in str(refused.value)
    assert session.cache.length == 5  # refused before anything moved
    await manager.step(session, steps(1), 3, rewind=True)
    assert session.cache.length == 4
    with pytest.raises(SessionRefused, match="starts at position 9 but the cache holds 4"):
        await manager.step(session, steps(1), 9, rewind=True)  # a rewind cannot go forward


async def test_an_unannounced_step_back_over_the_wire_fails_that_session_only(autojump_clock, swarm, expected):
    await swarm.add_node("a", 0, 6)
    mallory = await peer(swarm, "mallory")
    session = await open_session(swarm, mallory, "a", max_length=32)
    await session.step(steps(8), 0, timeout=5.0)
    with pytest.raises(HopFailed) as failed:
        await session.step(steps(1), 2, timeout=5.0)  # back to position 2, not saying so
    assert failed.value.retry is Retry.FATAL and "a step that goes back must say rewind" in failed.value.reason
    assert await honest_tokens(swarm) == expected  # the node serves others as before


async def test_only_rewinds_longer_than_a_drafted_step_are_paid_from_the_prefill_budget(autojump_clock,
                                                                                      checkpoint_factory):
    budget = 4 * (ROW_EXACT_TOKENS + 1)
    manager = SessionManager(load_span(checkpoint_factory("llama"), 0, 6),
                             SessionLimits(compute_in_thread=False, max_prefill_tokens_per_minute=budget))
    session = manager.open("s", "mallory", 0, 6, 64, 1)
    for _ in range(50):  # a token and its drafts, rewound again and again: costs what decode steps cost
        await manager.step(session, steps(ROW_EXACT_TOKENS), 0, rewind=True)
    assert manager.prefill_budgets.level("mallory", trio.current_time()) == budget
    for _ in range(4):
        await manager.step(session, steps(ROW_EXACT_TOKENS + 1), 0, rewind=True)
    with pytest.raises(SessionRefused) as refused:
        await manager.step(session, steps(ROW_EXACT_TOKENS + 1), 0, rewind=True)
    assert refused.value.code == ErrorCode.OVERLOADED and "prefill budget" in str(refused.value)
