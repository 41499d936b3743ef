"""Concurrent callers' small jobs, run together: the one micro-batcher of the client and the node.

A job joins the queue; whoever holds the lock next runs the queued jobs it may take in one call
(`run`), oldest first, so weights are read once for all of them: the client's LM head for
concurrent generations, a node's span for concurrent sessions' decode steps. A job takes its
place behind earlier ones of its key, and a pass takes jobs of one key up to `max_rows` rows, the
limit under which each row still computes what it computes alone (`shard.batch.exact_batch_rows`,
capped by the caller's own limit); a job that no other may join runs alone.

trio's lock is fair, so other users of the same lock (a node's prefill chunks) take turns with
batches. A job cancelled while it waits leaves the queue; one already taken into a pass is
computed, and its result dropped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

import trio


@dataclass(eq=False)
class Job:
    """One caller's work: its input, which pass it may share, and (once run) its output or error."""

    payload: Any
    key: Hashable  # jobs with equal keys may share a pass (e.g. one span's sessions)
    rows: int = 1
    max_rows: int = 1  # most rows of the pass this job joins; 1 or fewer: it runs alone
    output: Any = None
    error: BaseException | None = None
    done: bool = False


class MicroBatcher:
    """Runs queued `Job`s in passes of `run(jobs)`, which sets each job's output (or error).

    `run` raising marks every job of its pass failed with that error. `lock` may be shared with
    other work that must not overlap a pass (a node's prefill). A job that finds the lock free
    runs at once when `eager` (a node's decode step: its caller yields soon enough, sending the
    result); otherwise it yields first, so jobs queued in the same scheduling round share its pass
    (the client's head: concurrent generations reach it together).
    """

    def __init__(self, run: Callable[[list[Job]], Awaitable[None]], *, lock: trio.Lock | None = None,
                 eager: bool = True):
        self._run, self.eager = run, eager
        self.lock = lock if lock is not None else trio.Lock()
        self.queue: list[Job] = []
        self._joined = trio.Event()  # set (and replaced) whenever a job joins the queue
        self.passes = 0  # passes run, and the jobs they ran: their ratio is the mean batch
        self.jobs_run = 0

    async def submit(self, job: Job, *, company: Callable[[list[Job]], bool] | None = None,
                     wait_s: float = 0.0) -> Any:
        """Queue `job`, run it (with whatever else may share its pass) and return its output.

        When the lock is free, the job first waits up to `wait_s` for `company(queue)` to hold:
        for the other callers it expects, so that one pass takes them all.
        """
        self.queue.append(job)
        self._joined.set()
        self._joined = trio.Event()
        try:
            if company is not None and wait_s > 0 and not self.lock.locked():
                with trio.move_on_after(wait_s):
                    while not company(self.queue):
                        await self._joined.wait()
            if self.lock.locked() or not self.eager:
                await self.lock.acquire()
            else:  # nobody holds or waits for it: no yield
                await trio.lowlevel.checkpoint_if_cancelled()
                self.lock.acquire_nowait()
            try:
                while not job.done:  # not run yet by an earlier holder's pass: the oldest first, then ours
                    await self._run_pass(self._take(job.key))
            finally:
                self.lock.release()
        finally:
            if job in self.queue:  # cancelled while waiting: nobody runs it now
                self.queue.remove(job)
        if job.error is not None:
            raise job.error
        return job.output

    def waiting(self, key: Hashable) -> list[Job]:
        """Queued jobs of `key`, oldest first."""
        return [job for job in self.queue if job.key == key]

    def _take(self, key: Hashable) -> list[Job]:
        """The oldest queued jobs of `key` that fit one pass."""
        batch, rows = [], 0
        for job in self.queue:
            if job.key == key and (not batch or rows + job.rows <= min(job.max_rows, batch[0].max_rows)):
                batch.append(job)
                rows += job.rows
        self.queue = [job for job in self.queue if job not in batch]
        return batch

    async def _run_pass(self, batch: list[Job]) -> None:
        try:
            await self._run(batch)
        except Exception as err:  # noqa: BLE001 - handed to each job's own caller, which raises it
            for job in batch:
                if not job.done:
                    job.error = err
        for job in batch:
            job.done = True
        self.passes += 1
        self.jobs_run += len(batch)
