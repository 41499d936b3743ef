"""A progress bar of virtual time on stderr, with the wall time spent so far.

The wall clock here (`time.perf_counter`) is only for this display and the report's wall time;
nothing the simulation decides depends on it.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import trio

WIDTH = 30


def format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds:.0f}s"


class Progress:
    def __init__(self, label: str, stream: TextIO | None = None, *, steps: int = 100, enabled: bool = True):
        """A disabled bar still ticks (so the schedule, and the trace hash, do not depend on it) but prints nothing."""
        self.label, self.steps, self.enabled = label, steps, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.perf_counter()
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last_line = -1

    def line(self, now: float, total: float) -> str:
        share = min(1.0, now / total) if total > 0 else 1.0
        filled = int(share * WIDTH)
        wall = time.perf_counter() - self.started
        ratio = f"{now / wall:.0f}x" if wall > 0 else "-"
        return (f"{self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] {share:4.0%} "
                f"{format_duration(now)}/{format_duration(total)} virtual, {wall:.1f} s wall, {ratio}")

    def show(self, now: float, total: float) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + self.line(now, total))
        else:  # a log file: one line per tenth
            tenth = int(10 * now / total) if total > 0 else 10
            if tenth == self._last_line:
                return
            self._last_line = tenth
            self.stream.write(self.line(now, total) + "\n")
        self.stream.flush()

    async def run(self, total: float) -> None:
        while True:
            self.show(trio.current_time(), total)
            await trio.sleep(total / self.steps)

    def finish(self, now: float) -> None:
        if not self.enabled:
            return
        line = self.line(now, now) + " (done, sessions in flight drained)"
        self.stream.write(("\r" if self.tty else "") + line + "\n")
        self.stream.flush()
