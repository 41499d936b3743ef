"""Virtual time: a trio clock that jumps ahead whenever no task can run, with timers of its own.

trio's run loop asks its clock how long to sleep (`deadline_to_sleep_time`) only when no task is
runnable; `VirtualClock` answers by moving its time to the next event, so the loop wakes at once.
The next event is the nearer of trio's next deadline (a cancel scope's, e.g. an I/O timeout) and
the clock's own next timer. Timers are what a simulated world (`simulations`) waits on by the
thousand: a span's modelled compute time (`sleep_until`) and a message's arrival on a virtual link
(`call_at`: `mesh.memory_transport` hands the bytes over when they arrive, so the receiver wakes
once, not once when they are sent and again when they arrive). A trio sleep is a cancel scope whose deadline
cancels it, which costs a `Cancelled` exception per wake-up; a timer parks the task and the clock
reschedules it (timers due at one instant in the order they were set; trio then runs them as one
batch, in its own order, which a run seeds). So hours of a
1,000-node swarm pass in minutes, and the schedule still depends only on the run's seed.

As with `MockClock(autojump_threshold=0)`, time jumps the moment every task waits, so nothing here
may wait on real I/O or threads (the simulator runs compute inline); unlike it, idle time is not
first offered to `trio.testing.wait_all_tasks_blocked`.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable

import trio

IDLE_S = 86400.0  # no deadline and no timer: only real I/O could wake the run (a deadlock, or Ctrl-C)


class VirtualClock(trio.abc.Clock):
    def __init__(self, start: float = 0.0):
        self._now = start
        # heap of [when, order, task to wake or None, callback or None, its args]; a cancelled sleep has neither
        self._timers: list[list] = []
        self._order = itertools.count()
        self.jumps = 0

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return self._now

    def deadline_to_sleep_time(self, deadline: float) -> float:
        """Called by trio's run loop when no task can run: jump to the next deadline or timer."""
        while self._timers and self._timers[0][2] is None and self._timers[0][3] is None:
            heapq.heappop(self._timers)  # cancelled sleeps: nothing to wake
        timer = self._timers[0][0] if self._timers else math.inf
        if timer == deadline == math.inf:
            return IDLE_S
        if timer <= deadline:
            self._advance(timer)
            while self._timers and self._timers[0][0] <= self._now:
                _, _, task, callback, args = heapq.heappop(self._timers)
                if task is not None:
                    trio.lowlevel.reschedule(task)
                elif callback is not None:
                    callback(*args)
        else:
            self._advance(deadline)
        return 0.0

    def _advance(self, when: float) -> None:
        if when > self._now:
            self._now = when
            self.jumps += 1

    def call_at(self, when: float, callback: Callable[..., None], *args) -> None:
        """Call `callback(*args)` at `when` (at once if that has come), from trio's run loop between
        task steps: it must not block or raise, and may only do what needs no running task (wake
        one: a memory channel's `send_nowait`, `trio.lowlevel.reschedule`)."""
        if when <= self._now:
            callback(*args)
        else:
            heapq.heappush(self._timers, [when, next(self._order), None, callback, args])

    async def sleep_until(self, when: float) -> None:
        """`trio.sleep_until` on this clock's timers (a checkpoint; cancellable like any wait)."""
        if when <= self._now:
            await trio.lowlevel.checkpoint()
            return
        entry = [when, next(self._order), trio.lowlevel.current_task(), None, ()]
        heapq.heappush(self._timers, entry)

        def abort(_) -> trio.lowlevel.Abort:
            entry[2] = None  # popped later, skipped
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


async def sleep(seconds: float) -> None:
    """`trio.sleep`, on the running clock's own timers if it has them."""
    await sleep_until(trio.current_time() + seconds)


async def sleep_until(when: float) -> None:
    """Sleep until `when` on the running clock's own timers if it has them (`VirtualClock`), else as
    `trio.sleep_until` does."""
    own = getattr(trio.lowlevel.current_clock(), "sleep_until", None)
    await (own(when) if own is not None else trio.sleep_until(when))
