"""Span selection on hand-made coverage tables: joining, rebalancing, and swarms that settle."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.balance import (
    Served,
    block_throughputs,
    bottleneck,
    choose_move,
    choose_span,
    coverage,
    max_blocks_for,
)

GIB = 2**30


def table(*throughputs: float) -> list[Served]:
    """One single-block server per block with the given throughput (none where it is 0)."""
    return [Served(f"b{i}", i, i + 1, t) for i, t in enumerate(throughputs) if t]


def node(peer_id: str, start: int, end: int, block_seconds: float) -> Served:
    """A server announcing the throughput its speed gives on its span."""
    return Served(peer_id, start, end, 1 / ((end - start) * block_seconds))


# --- the swarm's numbers ---------------------------------------------------------------------

def test_block_throughputs_sum_the_covering_servers():
    served = [Served("a", 0, 4, 1.0), Served("b", 2, 6, 0.5)]
    assert block_throughputs(served, 6) == [1.0, 1.0, 1.5, 1.5, 0.5, 0.5]
    assert coverage(served, 6) == [1, 1, 2, 2, 1, 1]
    assert bottleneck(block_throughputs(served, 6)) == 0.5
    assert bottleneck(block_throughputs(served, 8)) == 0.0  # blocks 6 and 7 uncovered
    assert bottleneck([]) == 0.0


def test_bad_entries_are_clamped_or_ignored():
    served = [Served("left", -3, 2, 1.0),  # clamped to [0, 2)
              Served("right", 5, 12, 1.0),  # clamped to [5, 8)
              Served("outside", 8, 10, 1.0), Served("backwards", 4, 2, 1.0),
              Served("idle", 2, 5, 0.0), Served("negative", 2, 5, -1.0),
              Served("nan", 2, 5, math.nan), Served("inf", 2, 5, math.inf)]
    assert coverage(served, 8) == [1, 1, 0, 0, 0, 1, 1, 1]
    assert block_throughputs(served, 8) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert choose_span(served, 8, 3) == (2, 5)
    me = node("me", 0, 2, block_seconds=0.5)
    assert choose_move(served + [me], "me", 8, block_seconds=0.5) == (2, 4)


def test_max_blocks_for_a_memory_budget():
    assert max_blocks_for(10 * GIB, GIB, n_blocks=80, reserve_bytes=2 * GIB) == 8
    assert max_blocks_for(10 * GIB, GIB, n_blocks=6) == 6  # clamped to the model
    assert max_blocks_for(GIB - 1, GIB, n_blocks=80) == 0  # not even one block
    assert max_blocks_for(GIB, GIB, n_blocks=80, reserve_bytes=2 * GIB) == 0  # reserve above budget
    with pytest.raises(ValueError, match="block_bytes"):
        max_blocks_for(GIB, 0, n_blocks=80)


# --- joining: choose_span ---------------------------------------------------------------------

def test_first_node_takes_the_first_blocks():
    assert choose_span([], 8, 3) == (0, 3)


def test_second_node_fills_the_gap():
    first = [Served("a", 0, 3, 1.0)]
    assert choose_span(first, 8, 3) == (3, 6)
    assert choose_span(first, 8, 5) == (3, 8)
    assert choose_span(first, 8, 7) == (1, 8)  # the only window holding all five uncovered blocks


def test_window_with_an_uncovered_block_beats_weak_covered_ones():
    served = [Served("weak", 0, 3, 0.1), Served("strong", 3, 5, 100.0)]  # block 5 uncovered
    # [0, 2) has the smallest sum (0.2) but [4, 6) holds the uncovered block
    assert choose_span(served, 6, 2) == (4, 6)


def test_lexicographic_order_between_covered_windows_of_equal_sum():
    # windows of two: (1, 3), (2, 3), (2, 2); sums 4, 5, 4; the one holding the weakest block wins
    assert choose_span(table(1, 3, 2, 2), 4, 2) == (0, 2)
    assert choose_span(table(2, 2, 3, 1), 4, 2) == (2, 4)
    # same minimum in both: the second smallest decides, (1, 2, 9) < (1, 3, 3)
    assert choose_span(table(1, 2, 9, 3, 3, 1), 6, 3) == (0, 3)
    assert choose_span(table(1, 3, 3, 9, 2, 1), 6, 3) == (3, 6)


def test_ties_go_to_the_lowest_start_without_rng():
    assert choose_span(table(1, 1, 1, 1, 1, 1), 6, 2) == (0, 2)
    assert choose_span(table(5, 1, 5, 5, 1, 5), 6, 2) == (0, 2)  # (1, 5) at starts 0, 1, 3, 4


def test_ties_with_rng_are_deterministic_per_seed_and_spread_over_the_flush_windows():
    choices = [choose_span([], 8, 2, rng=random.Random(seed)) for seed in range(20)]
    assert choices == [choose_span([], 8, 2, rng=random.Random(seed)) for seed in range(20)]
    assert set(choices) == {(0, 2), (6, 8)}  # an empty model: either end, never the middle
    # a gap [2, 9) between covered blocks: a 3-block window goes flush against either side of it
    gap = [Served("a", 0, 2, 1.0), Served("b", 9, 12, 1.0)]
    assert {choose_span(gap, 12, 3, rng=random.Random(seed)) for seed in range(20)} == {(2, 5), (6, 9)}
    # rng only breaks ties: a strictly best window is taken whatever the seed
    assert {choose_span(table(3, 3, 1, 3), 4, 1, rng=random.Random(seed)) for seed in range(10)} == {(2, 3)}


def test_node_too_small_for_one_block_gets_none():
    assert choose_span([], 8, 0) is None
    assert choose_span(table(1, 1), 2, -1) is None
    assert choose_span([], 0, 4) is None  # a model without blocks


def test_node_holding_the_whole_model_takes_it():
    assert choose_span(table(1, 2, 3), 3, 3) == (0, 3)
    assert choose_span(table(1, 2, 3), 3, 40) == (0, 3)


servers_strategy = st.lists(st.builds(Served, st.sampled_from("abcdefgh"), st.integers(-5, 35),
                                      st.integers(-5, 35),
                                      st.one_of(st.floats(0.01, 100.0), st.sampled_from([0.0, -1.0, math.nan]))),
                            max_size=12)


@settings(max_examples=300, deadline=None)
@given(servers_strategy, st.integers(1, 30), st.integers(-2, 40), st.integers(0, 2**16))
def test_choose_span_always_gives_a_window_of_the_right_length_inside_the_model(served, n_blocks, max_blocks, seed):
    for rng in (None, random.Random(seed)):
        span = choose_span(served, n_blocks, max_blocks, rng=rng)
        if max_blocks < 1:
            assert span is None
        else:
            assert span is not None
            start, end = span
            assert end - start == min(max_blocks, n_blocks) and 0 <= start and end <= n_blocks


@settings(max_examples=200, deadline=None)
@given(servers_strategy, st.integers(1, 30), st.integers(0, 7), st.sampled_from([None, 1, 4, 50]))
def test_choose_move_stays_inside_the_model(served, n_blocks, mine, max_blocks):
    me = served[mine] if mine < len(served) else Served("me", 0, 1, 1.0)
    served = served + [me]
    move = choose_move(served, me.peer_id, n_blocks, block_seconds=0.01, max_blocks=max_blocks)
    if move is not None:
        start, end = move
        assert 0 <= start < end <= n_blocks
        if max_blocks is not None:
            assert end - start == min(max_blocks, n_blocks)


# --- rebalancing: choose_move -------------------------------------------------------------------

def test_node_in_an_over_covered_region_moves_into_a_gap():
    served = [Served("a", 0, 3, 1.0), node("me", 0, 3, block_seconds=1 / 3), Served("c", 3, 5, 1.0)]
    assert choose_move(served, "me", 6, block_seconds=1 / 3) == (3, 6)


def test_sole_cover_of_a_block_stays_even_when_another_block_is_weaker():
    served = [node("me", 0, 2, block_seconds=0.5), Served("a", 1, 4, 10.0), Served("b", 4, 5, 0.1)]
    assert choose_move(served, "me", 5, block_seconds=0.5) is None
    # without it block 0 would be uncovered: the planner keeps it there at any threshold
    assert choose_move(served, "me", 5, block_seconds=0.5, threshold=0.0) is None


@pytest.mark.parametrize(("weak", "threshold", "moves"), [
    (0.9, 0.2, False),  # bottleneck 0.9 -> 1.0: +11 %, under the 20 % margin
    (0.5, 0.2, True),  # bottleneck 0.5 -> 1.0: +100 %
    (0.9, 0.05, True),  # the same +11 % passes a 5 % margin
])
def test_hysteresis_moves_only_for_a_gain_above_the_threshold(weak, threshold, moves):
    # block 0: me + a (1 + 1); block 1: b alone (weak)
    served = [node("me", 0, 1, block_seconds=1.0), Served("a", 0, 1, 1.0), Served("b", 1, 2, weak)]
    move = choose_move(served, "me", 2, block_seconds=1.0, threshold=threshold)
    assert move == ((1, 2) if moves else None)


def test_a_node_at_a_best_window_stays_on_a_tie():
    # without me every window is (1, 1); lowest start would say 0, but staying wins the tie
    served = [Served("a", 0, 2, 1.0), Served("b", 2, 4, 1.0), node("me", 2, 4, block_seconds=0.5)]
    assert choose_move(served, "me", 4, block_seconds=0.5, threshold=0.0) is None


def test_float_sums_that_are_equal_in_exact_arithmetic_tie():
    # block 0: a (0.1) + b (0.2) + me (0.3); block 1: c (0.3). In floats 0.1 + 0.2 > 0.3, which would
    # make block 1 look weaker and a move to it look like a (tiny) gain
    served = [Served("a", 0, 1, 0.1), Served("b", 0, 1, 0.2), Served("c", 1, 2, 0.3),
              Served("me", 0, 1, 0.3)]
    assert 0.1 + 0.2 > 0.3
    assert choose_move(served, "me", 2, block_seconds=1 / 0.3, threshold=0.0) is None


def test_resize_with_max_blocks():
    served = [Served("a", 0, 4, 1.0), node("me", 0, 2, block_seconds=0.5)]
    # bottleneck 1.0 -> 1.5: one more server on every block, at half the speed per token
    assert choose_move(served, "me", 4, block_seconds=0.5, max_blocks=4) == (0, 4)
    assert choose_move(served, "me", 4, block_seconds=0.5, max_blocks=2) is None
    assert choose_move(served, "me", 4, block_seconds=0.5, max_blocks=0) is None


def test_node_missing_from_the_snapshot_stays():
    served = [Served("a", 0, 4, 1.0)]
    assert choose_move(served, "me", 4, block_seconds=0.5) is None
    assert choose_move(served + [Served("me", 6, 9, 1.0)], "me", 4, block_seconds=0.5) is None


def test_invalid_parameters_are_rejected():
    served = [Served("me", 0, 2, 1.0)]
    with pytest.raises(ValueError, match="block_seconds"):
        choose_move(served, "me", 4, block_seconds=0.0)
    with pytest.raises(ValueError, match="threshold"):
        choose_move(served, "me", 4, block_seconds=0.5, threshold=-0.1)


# --- swarms -------------------------------------------------------------------------------------

def sweep(spans: dict[str, tuple[int, int]], speeds: dict[str, float], n_blocks: int) -> int:
    """Every node in turn asks choose_move and applies the answer; returns how many moved."""
    moved = 0
    for peer in sorted(spans):
        served = [node(p, *span, block_seconds=speeds[p]) for p, span in spans.items()]
        move = choose_move(served, peer, n_blocks, block_seconds=speeds[peer])
        if move is not None:
            spans[peer] = move
            moved += 1
    return moved


def swarm_state(spans, speeds, n_blocks) -> tuple[int, float]:
    served = [node(p, *span, block_seconds=speeds[p]) for p, span in spans.items()]
    covered = sum(1 for c in coverage(served, n_blocks) if c)
    return covered, bottleneck(block_throughputs(served, n_blocks))


@pytest.mark.parametrize("seed", range(6))
def test_rebalancing_settles_without_oscillation(seed):
    rng = random.Random(seed)
    n_blocks = rng.choice([12, 24, 40])
    spans, speeds = {}, {}
    for i in range(rng.randint(10, 30)):
        length = rng.randint(1, n_blocks // 2)
        start = rng.randint(0, n_blocks - length)  # placed at random: work for the rebalancer
        spans[f"n{i:02d}"] = (start, start + length)
        speeds[f"n{i:02d}"] = rng.uniform(0.5, 4.0)
    before = swarm_state(spans, speeds, n_blocks)
    moves = []
    while not moves or moves[-1]:  # choose_move is pure: after one quiet sweep, every sweep is quiet
        moves.append(sweep(spans, speeds, n_blocks))
        assert len(moves) <= 5, moves
    after = swarm_state(spans, speeds, n_blocks)
    assert after[0] >= before[0]
    if after[0] == before[0] == n_blocks and any(moves):
        assert after[1] > before[1]


@pytest.mark.parametrize("tie_seed", [None, 0, 1, 2])
def test_joiners_cover_every_block_as_soon_as_their_capacity_allows(tie_seed):
    rng = random.Random(7)
    ties = None if tie_seed is None else random.Random(tie_seed)  # the daemon breaks ties at random
    n_blocks, block_bytes = 40, GIB
    served, capacity = [], 0
    for i in range(30):
        max_blocks = max_blocks_for(rng.randint(0, 9 * GIB), block_bytes, n_blocks=n_blocks,
                                    reserve_bytes=GIB // 2)
        span = choose_span(served, n_blocks, max_blocks, rng=ties)
        if max_blocks == 0:
            assert span is None
            continue
        served.append(node(f"n{i:02d}", *span, block_seconds=0.01))
        capacity += max_blocks
        covered = sum(1 for c in coverage(served, n_blocks) if c)
        assert covered == min(capacity, n_blocks)
    assert capacity > n_blocks  # the population is big enough for the check to mean something


def test_large_swarm():
    rng = random.Random(3)
    served, speeds = [], {}
    for i in range(1000):
        length, speed = rng.randint(4, 40), rng.uniform(0.002, 0.05)
        start = rng.randint(0, 80 - length)
        served.append(node(f"n{i:04d}", start, start + length, block_seconds=speed))
        speeds[f"n{i:04d}"] = speed
    for me in served[:3]:
        move = choose_move(served, me.peer_id, 80, block_seconds=speeds[me.peer_id])
        assert move is None or move[1] - move[0] == me.end - me.start


@pytest.mark.parametrize("seed", range(4))
def test_rebalancing_closes_the_gaps_left_by_concurrent_joiners(seed):
    rng = random.Random(seed)
    n_blocks = 32
    speeds = {f"n{i}": rng.uniform(0.5, 2.0) for i in range(8)}
    # all eight join at once from the same empty snapshot: ties broken at random, overlaps and gaps
    spans = {peer: choose_span([], n_blocks, rng.randint(4, 8), rng=rng) for peer in speeds}
    moves = []
    while not moves or moves[-1]:
        moves.append(sweep(spans, speeds, n_blocks))
        assert len(moves) <= 5, moves
    assert sum(end - start for start, end in spans.values()) >= n_blocks  # enough to cover the model
    assert swarm_state(spans, speeds, n_blocks)[0] == n_blocks
