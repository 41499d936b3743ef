"""The simulator's clock: virtual time that jumps when every task waits, with timers of its own."""

from __future__ import annotations

import pytest
import trio

from mesh import virtual_time
from mesh.virtual_time import VirtualClock


def run(fn, clock: VirtualClock | None = None):
    clock = clock if clock is not None else VirtualClock()
    return trio.run(fn, clock=clock), clock


def test_timers_wake_at_their_time_in_order():
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, when: float) -> None:
        await virtual_time.sleep_until(when)
        woke.append((name, trio.current_time()))

    async def main():
        async with trio.open_nursery() as nursery:
            for name, when in (("c", 3.0), ("a", 1.0), ("b2", 2.0), ("b1", 2.0), ("d", 3600.0)):
                nursery.start_soon(sleeper, name, when)
                await trio.lowlevel.checkpoint()  # each sets its timer before the next starts

    _, clock = run(main)
    assert woke[0] == ("a", 1.0) and sorted(woke[1:3]) == [("b1", 2.0), ("b2", 2.0)]  # one batch: trio's order
    assert woke[3:] == [("c", 3.0), ("d", 3600.0)]
    assert clock.current_time() == 3600.0 and clock.jumps == 4


def test_trio_deadlines_and_timers_interleave():
    """A cancel scope's deadline (an I/O timeout) fires at its time, before a later timer."""
    events: list[tuple[str, float]] = []

    async def main():
        with trio.move_on_after(5.0) as scope:
            await virtual_time.sleep(10.0)
        events.append(("timeout", trio.current_time()))
        assert scope.cancelled_caught
        await trio.sleep(1.0)  # trio's own sleep still works on this clock
        events.append(("trio sleep", trio.current_time()))
        await virtual_time.sleep(0.5)
        events.append(("timer", trio.current_time()))

    run(main)
    assert events == [("timeout", 5.0), ("trio sleep", 6.0), ("timer", 6.5)]


def test_a_cancelled_timer_neither_wakes_its_task_nor_moves_time_later():
    async def main():
        with trio.move_on_after(1.0):
            await virtual_time.sleep(100.0)
        return trio.current_time()

    now, clock = run(main)
    assert now == 1.0
    assert clock.current_time() == 1.0  # the abandoned 100 s timer was never jumped to


def test_sleeping_until_now_or_the_past_is_a_checkpoint_only():
    async def main():
        await virtual_time.sleep(2.0)
        await virtual_time.sleep_until(1.0)
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await virtual_time.sleep(0.0)  # still a cancellation point
        return trio.current_time()

    now, _ = run(main)
    assert now == 2.0


def test_time_stands_still_while_tasks_can_run():
    async def busy(n: int) -> None:
        for _ in range(n):
            await trio.lowlevel.checkpoint()

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(busy, 1000)
            nursery.start_soon(busy, 1000)
        return trio.current_time()

    now, clock = run(main)
    assert now == 0.0 and clock.jumps == 0


async def test_under_another_clock_the_helpers_are_trios_sleeps(autojump_clock):
    start = trio.current_time()
    await virtual_time.sleep(3.0)
    await virtual_time.sleep_until(start + 5.0)
    assert trio.current_time() == pytest.approx(start + 5.0)
