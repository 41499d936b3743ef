"""Span selection: which contiguous blocks [start, end) of a model a node serves, as pure functions.

This is Petals' algorithm (petals/server/block_selection.py) without its seams: the snapshot of
announced spans comes in as an argument, randomness as an optional seeded `random.Random`, and the
answer goes out as a return value. The daemon reads the DHT, calls these, and announces the result.

Model. Each server serves one span and announces its throughput, the tokens/s it pushes through its
whole span (k blocks at `block_seconds` per block per token make 1 / (k * block_seconds)). A block's
throughput is the sum over the servers covering it; the swarm's is the minimum over the blocks, its
bottleneck, which is 0 while any block is uncovered.

Joining (`choose_span`). A node that holds k blocks takes the window of k blocks where the swarm is
weakest: the start whose window's block throughputs, sorted ascending, are lexicographically
smallest. Why sorted and lexicographic rather than, say, the smallest sum: the node adds its
throughput to every block of its window and the swarm is only as fast as its slowest block, so a
window must first hold the weakest block (an uncovered one above all), then, among those, the second
weakest, and so on ("leximin"). A sum would let a window of many middling blocks beat the one holding
the bottleneck. Ties (equal sorted windows) go first to windows flush with an edge of the region
they tie in (a window that starts or ends where the block throughputs change, or at the model's
ends), so a window placed in a gap leaves the rest of the gap in one piece: spans pack, and every
block is covered as soon as the joiners' spans add up to the model. Among those, the lowest start;
or, given a seeded `rng`, `rng.choice`, so nodes joining at once from one snapshot spread out (a
gap has two flush windows). A node that cannot hold one block gets None.

Rebalancing (`choose_move`). A node takes itself out of the snapshot and finds its best window as
above, staying put on a tie. If that window is elsewhere it simulates the move, as Petals'
`should_choose_other_blocks` does: itself at the new window, then every server, itself included, in
peer id order, re-choosing greedily (staying put on ties), for at most `rounds` passes or until a
pass where nobody moves. It moves only if the outcome covers more blocks than the swarm does now, or
as many and a bottleneck above the current one times (1 + `threshold`), 0.2 by default. That margin
is the hysteresis: a node does not trade places for a gain within measurement noise, and a move has
to promise a real gain, which makes nodes chasing each other back and forth unlikely (the tests
check that swarms settle). The node's own throughput is 1 / (k * block_seconds) both where it is and
where it would go, so a stale announcement of its own cannot fake a gain.

Arithmetic. Throughputs are quantised to integers (2**-32 of the largest, at least 1) before they
are summed or compared, so a server's contribution removed and added back restores exactly the same
numbers and equal sums tie exactly; no eps is needed (Petals subtracts throughput * (1 + eps)).

Bad input. Spans are clamped to [0, n_blocks); a span empty after clamping, or a throughput that is
not a positive finite number, is ignored: that server contributes nothing. (`choose_move` still
reads the node's own span from its entry whatever the throughput it announced.)

Cost, for n blocks, S servers and windows of k blocks. A best window is found by refinement rather
than by sorting every window: keep the windows that hold the most copies of the smallest value, then
of the next smallest value where they still differ, and so on. That is O(n) at C speed (min, index)
for the first level plus O(k) per further level, usually a few; the worst case, O(n^2), is about
what sorting every window costs. `choose_span` is O(S + n) plus one choice. `choose_move` is O(S log S + n)
plus at most 1 + rounds * S choices, but two exact shortcuts skip most of that: when every block is
covered the bottleneck can never pass the mean block throughput, so if even the mean misses the goal
the node stays at once; and as a greedy move never uncovers a block nor lowers the bottleneck, the
simulation stops at the first state past the goal. At 1,000 servers and 80 blocks it takes 2 to 8
ms, and about 25 ms when the simulation runs its full two passes (a loaded 2-core machine).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate

DEFAULT_THRESHOLD = 0.2  # move only for a bottleneck gain above 20 %
SETTLE_ROUNDS = 2  # passes of the simulated swarm re-choosing after a move
_QUANTA = 2**32  # the largest throughput in a snapshot, in integer units


@dataclass(frozen=True)
class Served:
    """One server's announcement: it serves blocks [start, end) at `throughput` tokens/s."""

    peer_id: str
    start: int
    end: int
    throughput: float  # tokens/s through its whole span


def block_throughputs(served: Iterable[Served], n_blocks: int) -> list[float]:
    """Per block, the summed throughput of the usable servers covering it (0.0 where nobody does)."""
    totals = [0.0] * max(n_blocks, 0)
    for server in _usable(served, n_blocks):
        for block in range(server.start, server.end):
            totals[block] += server.throughput
    return totals


def bottleneck(throughputs: Sequence[float]) -> float:
    """The swarm's throughput: its weakest block's, 0.0 when a block is uncovered or there are none."""
    return max(min(throughputs, default=0.0), 0.0)


def coverage(served: Iterable[Served], n_blocks: int) -> list[int]:
    """Per block, how many usable servers cover it."""
    counts = [0] * max(n_blocks, 0)
    for server in _usable(served, n_blocks):
        for block in range(server.start, server.end):
            counts[block] += 1
    return counts


def max_blocks_for(memory_bytes: int, block_bytes: int, *, n_blocks: int, reserve_bytes: int = 0) -> int:
    """How many blocks fit in `memory_bytes` after `reserve_bytes`, at most n_blocks, 0 if not one."""
    if block_bytes <= 0:
        raise ValueError(f"block_bytes must be positive, got {block_bytes}")
    return max(0, min((memory_bytes - reserve_bytes) // block_bytes, n_blocks))


def choose_span(served: Iterable[Served], n_blocks: int, max_blocks: int, *,
                rng: random.Random | None = None) -> tuple[int, int] | None:
    """The window of min(max_blocks, n_blocks) blocks where the swarm is weakest (see the module
    docstring); None when the node cannot hold a single block or the model has none."""
    length = min(max_blocks, n_blocks)
    if length < 1:
        return None
    servers = _usable(served, n_blocks)
    quanta = _quantise([s.throughput for s in servers])
    totals = _sums([(s.start, s.end, q) for s, q in zip(servers, quanta)], n_blocks)
    start = _pick(_flush(_best_starts(totals, length), totals, length), None, rng)
    return start, start + length


def choose_move(served: Iterable[Served], me: str, n_blocks: int, *, block_seconds: float,
                max_blocks: int | None = None, threshold: float = DEFAULT_THRESHOLD,
                rng: random.Random | None = None, rounds: int = SETTLE_ROUNDS) -> tuple[int, int] | None:
    """Where node `me` should move its span, or None to stay (see the module docstring).

    The new window is as long as the current span, or min(max_blocks, n_blocks) when given (None if
    that is below 1). Also None when `me` has no entry with a span inside the model: a node that
    serves nothing should call `choose_span`. With max_blocks, a resize at the same start is a
    move like any other; the current (start, end) is never returned. `rng` only breaks ties for the
    node's own new window; the simulation of the swarm is deterministic.
    """
    if not (block_seconds > 0 and math.isfinite(block_seconds)):
        raise ValueError(f"block_seconds must be a positive number, got {block_seconds}")
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    served = list(served)
    spans = [_clamp(s, n_blocks) for s in served if s.peer_id == me]
    current = next((span for span in spans if span is not None), None)
    if current is None:
        return None
    length = current[1] - current[0] if max_blocks is None else min(max_blocks, n_blocks)
    if length < 1:
        return None
    others = [s for s in _usable(served, n_blocks) if s.peer_id != me]
    *quanta, q_now, q_new = _quantise([s.throughput for s in others]
                                      + [1 / ((current[1] - current[0]) * block_seconds),
                                         1 / (length * block_seconds)])
    placed = [(s.peer_id, s.start, s.end, q) for s, q in zip(others, quanta)]
    base = _sums([p[1:] for p in placed], n_blocks)
    starts = _best_starts(base, length)
    if current[1] - current[0] == length and current[0] in starts:
        return None  # already at a best window
    start = _pick(_flush(starts, base, length), None, rng)
    now = _state(_sums([p[1:] for p in placed] + [(*current, q_now)], n_blocks))
    goal = now[0], now[1] * (1 + threshold)  # the outcome must beat this: see _beyond
    total = sum((end - begin) * q for _, begin, end, q in placed) + length * q_new
    if now[0] == n_blocks and total <= goal[1] * n_blocks:
        return None  # the bottleneck cannot pass the mean, and even the mean is not enough
    if _reaches(placed + [(me, start, start + length, q_new)], n_blocks, rounds, goal):
        return start, start + length
    return None


def _clamp(server: Served, n_blocks: int) -> tuple[int, int] | None:
    """The server's span clamped to [0, n_blocks), None when nothing of it is left."""
    start, end = max(server.start, 0), min(server.end, n_blocks)
    return (start, end) if start < end else None


def _usable(served: Iterable[Served], n_blocks: int) -> list[Served]:
    """The servers that count, spans clamped; those with no block or no throughput are dropped."""
    usable = []
    for server in served:
        span = _clamp(server, n_blocks)
        if span is not None and server.throughput > 0 and math.isfinite(server.throughput):
            usable.append(Served(server.peer_id, *span, server.throughput))
    return usable


def _quantise(throughputs: list[float]) -> list[int]:
    """Positive throughputs as integers: the largest is _QUANTA, none falls below 1."""
    scale = _QUANTA / max(throughputs, default=1.0)
    return [max(1, round(t * scale)) for t in throughputs]


def _sums(spans: Iterable[tuple[int, int, int]], n_blocks: int) -> list[int]:
    """Per block, the sum of q over the (start, end, q) spans covering it (exact: integers)."""
    diff = [0] * (n_blocks + 1)
    for start, end, q in spans:
        diff[start] += q
        diff[end] -= q
    return list(accumulate(diff[:-1]))


def _state(totals: list[int]) -> tuple[int, int]:
    """(blocks covered, bottleneck) of per-block integer throughputs."""
    return len(totals) - totals.count(0), min(totals)


def _flush(starts: list[int], totals: list[int], length: int) -> list[int]:
    """Those of `starts` whose window begins or ends at a change of block throughput or at an end
    of the model (all of them when none does)."""
    n = len(totals)
    flush = [s for s in starts if s == 0 or s + length == n
             or totals[s - 1] != totals[s] or totals[s + length] != totals[s + length - 1]]
    return flush or starts


def _pick(starts: list[int], current: int | None, rng: random.Random | None) -> int:
    """One of the tied best starts: the current one if tied, else rng's choice, else the lowest."""
    if current in starts:
        return current
    return rng.choice(starts) if rng is not None else starts[0]


def _beyond(state: tuple[int, int], goal: tuple[int, float]) -> bool:
    """Whether a (covered, bottleneck) state covers more blocks than `goal`, or as many with a
    higher bottleneck."""
    return state[0] > goal[0] or (state[0] == goal[0] and state[1] > goal[1])


def _reaches(placed: list[tuple[str, int, int, int]], n_blocks: int, rounds: int,
             goal: tuple[int, float]) -> bool:
    """Whether the (peer, start, end, q) servers, re-choosing their windows in peer id order (each
    staying on a tie) for at most `rounds` passes or until nobody moves, get `_beyond` the goal.
    A greedy move never uncovers a block nor lowers the bottleneck (the window a server takes holds
    at least as many uncovered blocks as the one it leaves, and a weakest block no stronger), so the
    first state past the goal settles the answer."""
    placed = sorted(placed)
    totals = _sums([p[1:] for p in placed], n_blocks)
    if _beyond(_state(totals), goal):
        return True
    for _ in range(rounds):
        moved = False
        for i, (peer, start, end, q) in enumerate(placed):
            totals[start:end] = [t - q for t in totals[start:end]]
            new = _pick(_best_starts(totals, end - start), start, None)
            end += new - start
            totals[new:end] = [t + q for t in totals[new:end]]
            if new != start:
                placed[i], moved = (peer, new, end, q), True
                if _beyond(_state(totals), goal):
                    return True
        if not moved:
            return False
    return False


def _best_starts(totals: list[int], length: int) -> list[int]:
    """All starts (ascending) whose window of `length` blocks, sorted ascending, is lexicographically
    smallest. Refines instead of sorting windows: keep the windows holding the most copies of the
    smallest value, then of the next smallest value where they still differ, until one is left or
    the rest hold the same values. While the survivors are an interval [lo, hi] sharing a core
    [hi, lo + length), they differ only on the fringes [lo, hi) and [lo + length, hi + length), and
    the smallest fringe value, found on one fringe only, cuts the interval at its outermost copy."""
    n, last = len(totals), len(totals) - length
    low = min(totals)
    first, final = totals.index(low), n - 1 - totals[::-1].index(low)
    if final - first >= length:  # no window holds every copy of the minimum
        return _refine(totals, length, list(range(last + 1)), low)
    lo, hi = max(0, final - length + 1), min(first, last)  # the windows that hold them all
    while lo < hi:  # each cut leaves the fringes without the value it cut on, nor smaller ones
        left, right = totals[lo:hi], totals[lo + length:hi + length]
        low_left, low_right = min(left), min(right)
        if low_left < low_right:
            hi = lo + left.index(low_left)
        elif low_right < low_left:
            lo += len(right) - right[::-1].index(low_right)
        else:
            return _refine(totals, length, list(range(lo, hi + 1)), low_left)
    return [lo]


def _refine(totals: list[int], length: int, starts: list[int], low: int) -> list[int]:
    """The general case of `_best_starts`: those of `starts` that hold the most copies of `low`, then
    of each next larger value found where the surviving windows differ."""
    starts = _most(totals, length, starts, low)
    while len(starts) > 1:
        lo, hi = starts[0], starts[-1]
        differ = totals[lo:hi] + totals[lo + length:hi + length] if hi < lo + length else totals[lo:hi + length]
        rest = [t for t in differ if t > low]
        if not rest:
            break
        low = min(rest)
        starts = _most(totals, length, starts, low)
    return starts


def _most(totals: list[int], length: int, starts: list[int], value: int) -> list[int]:
    """Those of `starts` whose windows hold the most copies of `value`."""
    lo = starts[0]
    seen = [0, *accumulate([t == value for t in totals[lo:starts[-1] + length]])]
    counts = [seen[s - lo + length] - seen[s - lo] for s in starts]
    top = max(counts)
    return [s for s, c in zip(starts, counts) if c == top]
