"""Each remote peer's prefill is paid from a token bucket of its own (`node.sessions.PrefillBudgets`):
refilled continuously, holding one minute's worth, separate per peer, forgetting peers it no longer
needs; a step past the budget is refused (go elsewhere) and decode steps are never charged."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from node.sessions import PrefillBudgets, SessionLimits, SessionManager, SessionRefused
from protocol import ErrorCode, Retry, classify
from shard.span import load_span

HIDDEN = 64


def test_a_full_bucket_holds_one_minute_and_refills_continuously():
    budgets = PrefillBudgets(600)  # 10 tokens a second
    assert budgets.charge("a", 600, now=0.0) == 0.0
    assert budgets.charge("a", 1, now=0.0) == pytest.approx(0.1)
    assert budgets.level("a", 5.0) == pytest.approx(50)
    assert budgets.charge("a", 100, now=5.0) == pytest.approx(5.0)  # 50 short: 5 s more
    assert budgets.charge("a", 100, now=10.0) == 0.0
    assert budgets.level("a", 10_000.0) == 600  # saved up to a minute's worth, no more


def test_a_refused_charge_spends_nothing():
    budgets = PrefillBudgets(600)
    budgets.charge("a", 550, now=0.0)
    for _ in range(100):  # hammering while empty does not push the refill further away
        assert budgets.charge("a", 600, now=1.0) == pytest.approx(54.0)
    assert budgets.level("a", 1.0) == pytest.approx(60)


def test_peers_are_charged_separately():
    budgets = PrefillBudgets(600)
    assert budgets.charge("mallory", 600, now=0.0) == 0.0
    assert budgets.charge("mallory", 128, now=0.0) > 0
    assert budgets.charge("alice", 600, now=0.0) == 0.0  # mallory's use costs alice nothing


def test_a_full_bucket_pays_for_more_than_it_holds_and_goes_into_debt():
    budgets = PrefillBudgets(600)
    assert budgets.charge("a", 1000, now=0.0) == 0.0  # a batch of whole contexts is never refused outright
    assert budgets.level("a", 0.0) == -400
    assert budgets.charge("a", 1000, now=0.0) == pytest.approx(100.0)  # repay 400, then save a full 600
    assert budgets.charge("a", 1000, now=100.0) == 0.0


def test_zero_is_unlimited_and_remembers_nobody():
    budgets = PrefillBudgets(0)
    assert all(budgets.charge(f"p{i}", 1 << 20, now=0.0) == 0.0 for i in range(100))
    assert len(budgets) == 0


def test_peers_whose_buckets_refilled_are_forgotten():
    budgets = PrefillBudgets(600)
    for i in range(1000):
        budgets.charge(f"p{i}", 60, now=i * 0.001)
    assert len(budgets) == 1000
    budgets.charge("late", 60, now=10.0)  # 60 tokens refill in 6 s: every earlier bucket is full again
    assert len(budgets) == 1


def test_at_most_max_peers_are_remembered_the_longest_charged_forgotten_first():
    budgets = PrefillBudgets(600, max_peers=3)
    for i in range(5):
        budgets.charge(f"p{i}", 600, now=0.0)
    assert len(budgets) == 3
    assert [budgets.level(f"p{i}", 0.0) for i in range(5)] == [600, 600, 0, 0, 0]


@pytest.fixture(scope="module")
def span(checkpoint_factory):
    return load_span(checkpoint_factory("llama"), 0, 6)


def hidden(tokens: int) -> np.ndarray:
    return np.random.default_rng(tokens).standard_normal((1, tokens, HIDDEN)).astype(np.float32)


async def test_a_prefill_past_the_peers_budget_is_refused_go_elsewhere(autojump_clock, span):
    manager = SessionManager(span, SessionLimits(compute_in_thread=False, max_prefill_tokens_per_minute=120))
    session = manager.open("s", "mallory", 0, 6, 64, 1)
    for _ in range(2):
        await manager.step(session, hidden(60), 0, rewind=True)  # rewinds and prefills 60 positions again
    served = manager.tokens_served
    with pytest.raises(SessionRefused) as refused:
        await manager.step(session, hidden(60), 0, rewind=True)
    err = refused.value
    assert (err.code, err.retry_elsewhere, classify(err.code)) == (ErrorCode.OVERLOADED, True, Retry.BUSY)
    assert err.reason == ("peer mallory has used its prefill budget here (120 tokens a minute); "
                          "60 tokens refill in 30.0 s; go elsewhere")
    assert manager.tokens_served == served  # refused before computing anything
    honest = manager.open("h", "alice", 0, 6, 64, 1)
    await manager.step(honest, hidden(60), 0)  # another peer's budget is its own


async def test_decode_steps_are_never_charged(autojump_clock, span):
    manager = SessionManager(span, SessionLimits(compute_in_thread=False, max_prefill_tokens_per_minute=64))
    session = manager.open("s", "alice", 0, 6, 64, 1)
    await manager.step(session, hidden(20), 0)
    assert manager.prefill_budgets.charge("alice", 44, trio.current_time()) == 0.0  # the rest of the minute's
    for position in range(20, 48):  # decoding with an empty budget
        await manager.step(session, hidden(1), position)
    for position in range(48, 64, 8):  # a token and its drafts: a decode step too
        await manager.step(session, hidden(8), position)
    assert manager.prefill_budgets.level("alice", trio.current_time()) < 1


async def test_the_budget_refills_on_trios_clock(autojump_clock, span):
    manager = SessionManager(span, SessionLimits(compute_in_thread=False, max_prefill_tokens_per_minute=64))
    session = manager.open("s", "alice", 0, 6, 64, 1)
    await manager.step(session, hidden(64), 0)
    with pytest.raises(SessionRefused, match="32 tokens refill in 30.0 s"):
        await manager.step(session, hidden(32), 0, rewind=True)
    await trio.sleep(30.0)
    await manager.step(session, hidden(32), 0, rewind=True)
