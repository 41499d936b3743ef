"""The simulator's clock: virtual time that jumps when every task waits, with timers of its own; and
the in-memory transport's delivery under it and under trio's MockClock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from mesh import virtual_time
from mesh.errors import StreamClosed
from mesh.memory_transport import Link, MemoryNetwork, MemoryTransport
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


def test_callbacks_run_at_their_time_among_the_timers():
    events: list[tuple[str, float]] = []

    async def main():
        clock = trio.lowlevel.current_clock()
        clock.call_at(2.0, lambda: events.append(("callback", trio.current_time())))
        clock.call_at(0.0, lambda: events.append(("due already", trio.current_time())))
        await virtual_time.sleep(1.0)
        events.append(("timer", trio.current_time()))
        await virtual_time.sleep(5.0)

    run(main)
    assert events == [("due already", 0.0), ("timer", 1.0), ("callback", 2.0)]


# --- the in-memory transport under either clock -------------------------------------------------


@pytest.fixture(params=["mock", "virtual"])
def clock(request):
    """pytest-trio runs a test under the clock among its arguments."""
    return trio.testing.MockClock(autojump_threshold=0) if request.param == "mock" else VirtualClock()


class Latencies:
    """A link model whose one-way latency is the next of `seconds` for each message."""

    def __init__(self, *seconds: float):
        self.seconds = list(seconds)

    def __call__(self, src: str, dst: str) -> Link:
        return Link(self.seconds.pop(0) if self.seconds else 0.0)


async def collect(stream, arrivals: list[tuple[bytes, float]]) -> None:
    while data := await stream.receive_some(1 << 16):
        arrivals.append((data, trio.current_time()))


async def open_pair(network: MemoryNetwork, nursery, handler):
    a = await nursery.start(hold_transport, network, "a")
    b = await nursery.start(hold_transport, network, "b")
    b.set_handler("/t", handler)
    a.add_peer_addrs("b", b.addrs)
    return await a.open_stream("b", "/t", timeout=5)


async def hold_transport(network, name, *, task_status=trio.TASK_STATUS_IGNORED):
    async with MemoryTransport.open(network, name) as transport:
        task_status.started(transport)
        await trio.sleep_forever()


async def test_chunks_arrive_in_order_when_a_later_one_is_faster(clock):
    """Like TCP: the second chunk (0.1 s latency) waits for the first (0.5 s); the end of the stream
    (sent at once) comes after both."""
    assert trio.lowlevel.current_clock() is clock
    network = MemoryNetwork()
    network.link_model = Latencies(0.5, 0.1)
    arrivals: list[tuple[bytes, float]] = []
    done = trio.Event()

    async def handler(stream):
        await collect(stream, arrivals)
        done.set()

    async with trio.open_nursery() as nursery:
        stream = await open_pair(network, nursery, handler)
        start = trio.current_time()
        await stream.send_all(b"first")
        await stream.send_all(b"second")
        await stream.aclose()
        await done.wait()
        nursery.cancel_scope.cancel()
    received = b"".join(data for data, _ in arrivals)
    assert received == b"firstsecond"
    assert [t - start for _, t in arrivals] == [pytest.approx(0.5)] * len(arrivals)


async def test_a_reset_loses_the_chunks_in_flight(clock):
    network = MemoryNetwork()
    network.link_model = Latencies(1.0)
    outcome: list[object] = []
    done = trio.Event()

    async def handler(stream):
        try:
            outcome.append(await stream.receive_some(100))
        except StreamClosed as err:
            outcome.append(err)
        done.set()

    async with trio.open_nursery() as nursery:
        stream = await open_pair(network, nursery, handler)
        await stream.send_all(b"lost")
        stream.reset()
        await done.wait()
        with pytest.raises(StreamClosed):
            await stream.send_all(b"more")
        nursery.cancel_scope.cancel()
    assert len(outcome) == 1 and isinstance(outcome[0], StreamClosed)
