"""Inference sessions on a node: admission (limits, KV-cache budget), positions, and the compute.

A session holds a KV cache for a sub-range of the node's span. Opening reserves the cache's bytes
against the node's budget up front, so a node never runs out of memory mid-answer; closing (or
the session's stream ending for any reason) gives them back. Compute runs one forward pass at a
time: decode steps of concurrent sessions batched into one pass, prefill in a worker thread, in
chunks, so the event loop keeps answering pings and other sessions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import trio

from protocol import Codec, ErrorCode
from shard.batch import BatchItem
from shard.errors import ShardError
from shard.kv_cache import KVCache
from shard.span import SpanModel


# Quantizations whose kernels compute each row on its own (int8 in groups of <= 48 rows, which
# shard.batch keeps), so a step batched with others gives the bits it gives alone, and a replay
# after failover rebuilds the same KV cache. fp32/bf16 GEMMs round differently with the row count
# (~1e-6) and gain little from batching on CPUs (8 rows cost ~3x one here), so those spans run
# decode steps one at a time.
ROW_EXACT = frozenset({"int8", "int4"})


class SessionRefused(Exception):
    """An open or step the node will not serve; becomes an `Error` reply with `code`."""

    def __init__(self, code: ErrorCode, reason: str, *, retry_elsewhere: bool = False):
        self.code, self.reason, self.retry_elsewhere = code, reason, retry_elsewhere
        super().__init__(reason)


@dataclass(frozen=True)
class SessionLimits:
    max_sessions: int = 16
    kv_cache_bytes: int = 1 << 30
    max_length: int = 4096  # positions per session, also capped by the model's context
    idle_timeout_s: float = 300.0
    max_batch: int = 8
    compute_in_thread: bool = True  # False runs torch in the event loop (virtual-time tests, simulator)
    # Steps of at most this many tokens (batch x length: decode steps) run in the event loop even so:
    # handing one to a worker thread and back cost 3-5 ms per step in bench_swarm (GIL hand-offs
    # between torch ops), more than a decode step keeps the loop busy. Prefill and replay use the thread.
    inline_max_tokens: int = 8
    max_batch_rows: int = 32  # decode rows in one batched pass (int8 kernels stay row-exact up to 48)
    inline_max_batch_rows: int = 16  # a larger decode batch runs in the worker thread
    prefill_chunk_tokens: int = 128  # prefill and replay run in pieces this long, decode batches between
    # A decode step that finds the node idle waits up to this long for the steps of the other sessions
    # that stepped within `batch_window_s`, so that one pass takes them all instead of this one alone.
    batch_wait_s: float = 0.015
    batch_window_s: float = 2.0
    evict_idle_s: float = 30.0  # a session idle this long may be evicted to make room for a new one


class ServedSession:
    def __init__(self, session_id: str, peer_id: str, root: SpanModel, span: SpanModel, cache: KVCache):
        self.session_id, self.peer_id = session_id, peer_id
        self.root = root  # the node's span the session was opened on (steps batch with its other sessions)
        self.span, self.cache = span, cache  # `span`: the session's blocks, a view of `root`
        self.steps = 0
        self.codec = Codec.FP32  # what step results are encoded with (the client's choice)
        self.last_active = trio.current_time()
        self.ended: SessionRefused | None = None  # set when the node ends the session (eviction, drain, move)

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes


@dataclass(eq=False)
class _Step:
    """One session's step waiting for (or done by) a batched forward pass."""

    session: ServedSession
    hidden: np.ndarray  # [B, T, D]
    start_position: int
    output: np.ndarray | None = None
    seconds: float = 0.0
    error: Exception | None = None

    @property
    def rows(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]


class SessionManager:
    """Sessions on one node and the node's compute.

    Decode steps (at most `inline_max_tokens` rows) of concurrent sessions run batched: a step joins
    the queue, and whichever step holds the compute lock next runs every queued decode step on the
    same span as one forward pass (`shard.batch`), so the weights are read once for all of them.
    trio's lock is fair, so prefill and replay steps take turns with decode batches, one chunk of at
    most `prefill_chunk_tokens` positions per turn, and a long prompt cannot stall other sessions'
    decoding for longer than one chunk.
    """

    def __init__(self, span: SpanModel, limits: SessionLimits):
        self.span, self.limits = span, limits
        self.sessions: dict[str, ServedSession] = {}
        self.reserved_bytes = 0
        self.draining = False
        self.compute_lock = trio.Lock()
        self._queue: list[_Step] = []
        self._queued = trio.Event()  # set (and replaced) whenever a decode step joins the queue
        self.tokens_served = 0
        self.compute_seconds = 0.0
        self.batches = 0  # forward passes of decode steps, and the steps they ran: their ratio is the mean batch
        self.batched_steps = 0
        self.on_end: Callable[[ServedSession], None] = lambda session: None  # the server ends its stream

    @property
    def free_cache_tokens(self) -> int:
        """How many more positions (batch 1) the budget allows."""
        per_token = self.span.cache_bytes(1, 1)
        return max(0, (self.limits.kv_cache_bytes - self.reserved_bytes) // per_token)

    def open(self, session_id: str, peer_id: str, start: int, end: int, max_length: int, batch: int) -> ServedSession:
        if self.draining:
            raise SessionRefused(ErrorCode.SHUTTING_DOWN, "this node is shutting down; go elsewhere",
                                 retry_elsewhere=True)
        if session_id in self.sessions:
            raise SessionRefused(ErrorCode.UNEXPECTED_MESSAGE, f"session {session_id!r} is already open")
        if not self.span.start <= start < end <= self.span.end:
            raise SessionRefused(ErrorCode.SPAN_NOT_SERVED,
                                 f"blocks [{start}, {end}) are not within served [{self.span.start}, {self.span.end})",
                                 retry_elsewhere=True)
        limit = min(self.limits.max_length, self.span.config.max_position_embeddings)
        if max_length > limit:
            raise SessionRefused(ErrorCode.INVALID_MESSAGE, f"max_length {max_length} exceeds this node's {limit}")
        if batch > self.limits.max_batch:
            raise SessionRefused(ErrorCode.INVALID_MESSAGE, f"batch {batch} exceeds this node's {self.limits.max_batch}")
        if len(self.sessions) >= self.limits.max_sessions:
            raise SessionRefused(ErrorCode.OVERLOADED, f"all {self.limits.max_sessions} session slots are taken",
                                 retry_elsewhere=True)
        view = self.span if (start, end) == (self.span.start, self.span.end) else self.span.sub_span(start, end)
        needed = view.cache_bytes(batch, max_length)
        self._evict_idle_for(needed)
        if self.reserved_bytes + needed > self.limits.kv_cache_bytes:
            raise SessionRefused(ErrorCode.CACHE_FULL,
                                 f"session needs {needed} bytes of KV cache; {self.limits.kv_cache_bytes - self.reserved_bytes} free",
                                 retry_elsewhere=True)
        session = ServedSession(session_id, peer_id, self.span, view, view.new_cache(batch, max_length))
        self.sessions[session_id] = session
        self.reserved_bytes += session.nbytes
        return session

    def _evict_idle_for(self, needed: int) -> None:
        """Evict the longest-idle sessions (idle at least `evict_idle_s`) until `needed` bytes fit."""
        now = trio.current_time()
        idle = sorted((s for s in self.sessions.values() if now - s.last_active >= self.limits.evict_idle_s),
                      key=lambda s: s.last_active)
        for session in idle:
            if self.reserved_bytes + needed <= self.limits.kv_cache_bytes:
                return
            self.end(session, SessionRefused(ErrorCode.CACHE_FULL, "session evicted to make room in this node's "
                                             "KV cache; replay elsewhere", retry_elsewhere=True))

    def end(self, session: ServedSession, reason: SessionRefused) -> None:
        """End `session` on the node's initiative; its stream tells the client `reason`."""
        session.ended = reason
        self.close(session)
        self.on_end(session)

    def close(self, session: ServedSession) -> None:
        if self.sessions.pop(session.session_id, None) is not None:
            self.reserved_bytes -= session.nbytes

    async def step(self, session: ServedSession, hidden: np.ndarray, start_position: int,
                   chunks: tuple[int, ...] = ()) -> tuple[np.ndarray, float]:
        """Run the session's blocks on `hidden` [B, T, D] at `start_position`, as `chunks` (token
        counts, run one after another) when given; returns (output, seconds of compute)."""
        if self.draining:
            raise SessionRefused(ErrorCode.SHUTTING_DOWN, "this node is shutting down; replay elsewhere",
                                 retry_elsewhere=True)
        if start_position > session.cache.length:
            raise SessionRefused(ErrorCode.POSITION_MISMATCH,
                                 f"step starts at position {start_position} but the cache holds {session.cache.length}")
        rows = hidden.shape[0] * hidden.shape[1]
        if rows <= self.limits.inline_max_tokens and len(chunks) <= 1:
            output, seconds = await self._decode(_Step(session, hidden, start_position))
        else:
            output, seconds = await self._prefill(session, hidden, start_position, chunks)
        session.steps += 1
        session.last_active = trio.current_time()
        return output, seconds

    async def _decode(self, step: _Step) -> tuple[np.ndarray, float]:
        self._queue.append(step)
        self._queued.set()
        self._queued = trio.Event()
        lock = self.compute_lock
        try:
            if not lock.locked():
                await self._wait_for_company(step.session)
            if lock.locked():
                await lock.acquire()
            else:  # nobody holds or waits for it: no yield (a decode step yields soon enough, sending its result)
                await trio.lowlevel.checkpoint_if_cancelled()
                lock.acquire_nowait()
            try:
                while step.output is None and step.error is None:  # not run yet by an earlier holder's batch
                    await self._run_batch(self._take_batch(step.session.root))  # oldest first, then ours
            finally:
                lock.release()
        finally:
            if step in self._queue:  # cancelled while waiting: nobody runs it now
                self._queue.remove(step)
        if step.error is not None:
            raise step.error
        return step.output, step.seconds

    async def _wait_for_company(self, session: ServedSession) -> None:
        """Wait (at most `batch_wait_s`) until every other session on this span that stepped within
        `batch_window_s` has a step queued too."""
        limits, now = self.limits, trio.current_time()
        expected = {s for s in self.sessions.values() if s is not session and s.root is session.root
                    and s.steps > 0 and now - s.last_active <= limits.batch_window_s}
        if limits.batch_wait_s <= 0 or not expected or session.root.quant not in ROW_EXACT:
            return
        with trio.move_on_after(limits.batch_wait_s):
            while not expected <= {queued.session for queued in self._queue}:
                await self._queued.wait()

    def _take_batch(self, root: SpanModel) -> list[_Step]:
        """The queued decode steps on `root`, oldest first, up to `max_batch_rows` rows; only the
        oldest on a span whose rows are not computed independently (see `ROW_EXACT`)."""
        batch, rows = [], 0
        limit = self.limits.max_batch_rows if root.quant in ROW_EXACT else 0
        for step in self._queue:
            if step.session.root is root and (not batch or rows + step.rows <= limit):
                batch.append(step)
                rows += step.rows
        self._queue = [step for step in self._queue if step not in batch]
        return batch

    async def _run_batch(self, batch: list[_Step]) -> None:
        started = trio.current_time()
        rows = sum(step.rows for step in batch)
        try:
            if self.limits.compute_in_thread and rows > self.limits.inline_max_batch_rows:
                outputs = await trio.to_thread.run_sync(_forward_batch, batch)
            else:
                outputs = _forward_batch(batch)
            await _modelled_compute(max((step.session.span for step in batch), key=_blocks), 1, (rows,))
        except Exception as err:  # noqa: BLE001 - handed to the step's own task, which raises it
            outputs = [err] * len(batch)
        seconds = trio.current_time() - started
        for step, output in zip(batch, outputs):
            if isinstance(output, Exception):
                step.error = output
            else:
                step.output, step.seconds = output, seconds
                self.tokens_served += step.rows
        self.batches += 1
        self.batched_steps += len(batch)
        self.compute_seconds += seconds

    async def _prefill(self, session: ServedSession, hidden: np.ndarray, start_position: int,
                       chunks: tuple[int, ...]) -> tuple[np.ndarray, float]:
        """Run `hidden` as `chunks`, one turn of the compute lock per `prefill_chunk_tokens` positions."""
        if sum(chunks or (0,)) not in (0, hidden.shape[1]):
            raise SessionRefused(ErrorCode.INVALID_MESSAGE,
                                 f"chunks {list(chunks)} do not add up to the step's {hidden.shape[1]} tokens")
        if start_position < session.cache.length:
            session.cache.truncate(start_position)  # the client redoes a step whose result it lost
        outputs, seconds, offset = [], 0.0, 0
        for turn in prefill_turns(chunks or (hidden.shape[1],), self.limits.prefill_chunk_tokens):
            part = hidden[:, offset:offset + sum(turn)]
            offset += sum(turn)
            async with self.compute_lock:  # yields between turns: decode steps get theirs
                started = trio.current_time()
                if self.limits.compute_in_thread:
                    outputs.append(await trio.to_thread.run_sync(_forward, session, part, turn))
                else:
                    outputs.append(_forward(session, part, turn))
                await _modelled_compute(session.span, hidden.shape[0], turn)
                seconds += trio.current_time() - started
        self.tokens_served += hidden.shape[0] * hidden.shape[1]
        self.compute_seconds += seconds
        return np.concatenate(outputs, axis=1), seconds


def prefill_turns(chunks: tuple[int, ...], limit: int) -> list[tuple[int, ...]]:
    """`chunks` (the forward passes a step asks for) as turns of at most `limit` positions: a long
    chunk is split into passes of `limit`; short ones are grouped, a turn running them one by one.

    The passes depend only on `chunks`, so a replay (the original steps' sizes as its chunks)
    repeats exactly the passes the original steps ran.
    """
    turns: list[tuple[int, ...]] = []
    current: list[int] = []
    for chunk in chunks:
        for done in range(0, chunk, limit):
            piece = min(limit, chunk - done)
            if current and sum(current) + piece > limit:
                turns.append(tuple(current))
                current = []
            current.append(piece)
    if current:
        turns.append(tuple(current))
    return turns


def _blocks(span: SpanModel) -> int:
    return span.end - span.start


def _forward(session: ServedSession, hidden: np.ndarray, passes: tuple[int, ...] = ()) -> np.ndarray:
    """The session's blocks on `hidden` [B, T, D], as forward passes of `passes` tokens each."""
    inputs = torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32))
    try:
        if len(passes) <= 1:  # one pass: a decode step, or a prefill chunk
            output = session.span(inputs, session.cache)
            return (output if output.dtype == torch.float32 else output.to(torch.float32)).numpy()
        outputs = [session.span(part, session.cache) for part in inputs.split(list(passes), dim=1)]
    except ShardError as err:
        raise SessionRefused(ErrorCode.INVALID_TENSOR, str(err)) from err
    return torch.cat(outputs, dim=1).to(torch.float32).numpy()


def _forward_batch(batch: list[_Step]) -> list[np.ndarray | Exception]:
    """Each step's output, from one forward pass over all of them when they can share one; a step
    the pass cannot take (bad shape, full cache) gets its own error and the others run without it."""
    for step in batch:
        if step.start_position < step.session.cache.length:
            step.session.cache.truncate(step.start_position)  # the client redoes a step whose result it lost
    if len(batch) == 1:
        try:
            return [_forward(batch[0].session, batch[0].hidden)]
        except SessionRefused as err:
            return [err]
    root = batch[0].session.root
    items = [BatchItem(torch.from_numpy(np.ascontiguousarray(step.hidden, dtype=np.float32)), step.session.cache,
                       step.session.span.start, step.session.span.end) for step in batch]
    try:
        return [out.to(torch.float32).numpy() for out in root.forward_batch(items)]
    except ShardError:  # validated before any cache moved: find the culprit by running each alone
        return [_forward_batch([step])[0] for step in batch]


async def _modelled_compute(span: SpanModel, batch: int, chunks: tuple[int, ...]) -> None:
    """A span that models its compute time (the simulator's) waits it out here, in trio's clock:
    one forward pass per chunk, as `_forward` runs them.

    Real spans have no `compute_delay`, so for them this does nothing.
    """
    delay = getattr(span, "compute_delay", None)
    if delay is not None:
        for tokens in chunks:
            await delay(batch * tokens)
