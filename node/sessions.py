"""Inference sessions on a node: admission (limits, KV-cache budget), positions, and the compute.

A session holds a KV cache for a sub-range of the node's span. Opening reserves the cache's bytes
against the node's budget up front, so a node never runs out of memory mid-answer; closing (or
the session's stream ending for any reason) gives them back. Compute runs one forward pass at a
time: decode steps of concurrent sessions batched into one pass, prefill in a worker thread, in
chunks, so the event loop keeps answering pings and other sessions. Each remote peer's prefill
(steps of more than one position) is paid from a token bucket of its own (`PrefillBudgets`), so no
peer monopolizes the compute by re-prefilling long prompts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import trio

from mesh.batcher import Job, MicroBatcher
from mesh.virtual_time import sleep_until
from node.chaos import Chaos
from protocol import Codec, ErrorCode
from shard.errors import ShardError
from shard.interfaces import ROW_EXACT_TOKENS, BatchStep, Cache, Span


class SessionRefused(Exception):
    """An open or step the node will not serve; becomes an `Error` reply with `code`."""

    def __init__(self, code: ErrorCode, reason: str, *, retry_elsewhere: bool = False):
        self.code, self.reason, self.retry_elsewhere = code, reason, retry_elsewhere
        super().__init__(reason)


@dataclass(frozen=True)
class SessionLimits:
    max_sessions: int = 16
    # One peer may hold at most this many (an API server's client holds one per user it serves); a
    # peer over it is refused, so no single peer can take every slot.
    max_sessions_per_peer: int = 8
    kv_cache_bytes: int = 1 << 30
    max_length: int = 4096  # positions per session, also capped by the model's context
    idle_timeout_s: float = 300.0
    max_batch: int = 8
    compute_in_thread: bool = True  # False runs torch in the event loop (virtual-time tests, simulator)
    # Steps of at most this many tokens (batch x length: decode steps) run in the event loop even so:
    # handing one to a worker thread and back cost 3-5 ms per step in bench_swarm (GIL hand-offs
    # between torch ops), more than a decode step keeps the loop busy. Prefill and replay use the thread.
    inline_max_tokens: int = 8
    max_batch_rows: int = 32  # decode rows in one batched pass, at most the span's `batch_rows`
    inline_max_batch_rows: int = 16  # a larger decode batch runs in the worker thread
    prefill_chunk_tokens: int = 128  # prefill and replay run in pieces this long, decode batches between
    # A decode step that finds the node idle waits up to this long for the steps of the other sessions
    # that stepped within `batch_window_s`, so that one pass takes them all instead of this one alone.
    batch_wait_s: float = 0.015
    batch_window_s: float = 2.0
    evict_idle_s: float = 30.0  # a session idle this long may be evicted to make room for a new one
    # Positions of prefill (steps of more than 16: prompts, rewinds, replays; decode steps and a token
    # with its drafts, `ROW_EXACT_TOKENS` at most, are free)
    # one peer may have computed a minute, saved up to a minute's worth; a peer past it is refused,
    # go elsewhere. 8 whole default contexts: an honest long prompt always fits. 0: unlimited.
    max_prefill_tokens_per_minute: int = 8 * 4096


class PrefillBudgets:
    """A token bucket per remote peer: `per_minute` tokens a minute, refilled continuously, holding
    at most a minute's worth. Pure: callers pass the time (trio's clock, virtual in the simulator).

    Memory is bounded: a peer whose bucket is full again is forgotten (a new bucket is the same),
    and at most `max_peers` are kept; past that the peer charged longest ago is forgotten.
    """

    def __init__(self, per_minute: int, *, max_peers: int = 4096):
        if per_minute < 0 or max_peers < 1:
            raise ValueError(f"per_minute must be >= 0 and max_peers >= 1, got {per_minute}, {max_peers}")
        self.per_minute, self.max_peers = per_minute, max_peers
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # peer -> (level, when), oldest first

    def __len__(self) -> int:
        """Peers remembered now."""
        return len(self._buckets)

    @property
    def unlimited(self) -> bool:
        return self.per_minute == 0

    def level(self, peer_id: str, now: float) -> float:
        """Tokens `peer_id` may spend at `now`; below zero, its debt (see `charge`)."""
        if peer_id not in self._buckets:
            return float(self.per_minute)
        level, when = self._buckets[peer_id]
        return min(float(self.per_minute), level + (now - when) * self.per_minute / 60.0)

    def charge(self, peer_id: str, tokens: int, now: float) -> float:
        """Spend `tokens` of `peer_id`'s budget at `now`: 0.0 when spent, else the seconds until the
        peer has enough (nothing is spent then). A full bucket pays even for more than it holds (a
        batch of whole contexts) and goes into debt, repaid before the peer's next prefill."""
        if self.unlimited:
            return 0.0
        self._forget_full(now)
        level = self.level(peer_id, now)
        needed = min(tokens, self.per_minute)
        if level < needed:
            return (needed - level) * 60.0 / self.per_minute
        self._buckets.pop(peer_id, None)
        self._buckets[peer_id] = (level - tokens, now)
        while len(self._buckets) > self.max_peers:
            self._buckets.popitem(last=False)
        return 0.0

    def _forget_full(self, now: float) -> None:
        """Drop the longest-charged peers while their buckets have refilled."""
        while self._buckets:
            peer_id = next(iter(self._buckets))
            if self.level(peer_id, now) < self.per_minute:
                return
            del self._buckets[peer_id]


class ServedSession:
    def __init__(self, session_id: str, peer_id: str, root: Span, span: Span, cache: Cache):
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
    """One session's decode step: the payload of its `mesh.batcher.Job`."""

    session: ServedSession
    hidden: np.ndarray  # [B, T, D]
    start_position: int

    @property
    def rows(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]


class SessionManager:
    """Sessions on one node and the node's compute.

    Decode steps (at most `inline_max_tokens` rows) of concurrent sessions run batched
    (`mesh.batcher`): a step joins the queue, and whichever step holds the compute lock next runs
    the queued decode steps on the same span as one forward pass (`Span.run_batch`), up to the
    span's `batch_rows`, so the weights are read once for all of them.
    trio's lock is fair, so prefill and replay steps take turns with decode batches, one chunk of at
    most `prefill_chunk_tokens` positions per turn, and a long prompt cannot stall other sessions'
    decoding for longer than one chunk.
    """

    def __init__(self, span: Span, limits: SessionLimits, *, chaos: Chaos | None = None):
        self.span, self.limits = span, limits
        self.chaos = chaos  # fault injection on purpose (`hearth node --chaos`): every output goes through it
        self.sessions: dict[str, ServedSession] = {}
        self.reserved_bytes = 0
        self.draining = False
        self.compute_lock = trio.Lock()
        self.decoder = MicroBatcher(self._run_batch, lock=self.compute_lock)
        self.prefill_budgets = PrefillBudgets(limits.max_prefill_tokens_per_minute)
        self.tokens_served = 0
        self.compute_seconds = 0.0
        self.on_end: Callable[[ServedSession], None] = lambda session: None  # the server ends its stream

    @property
    def batches(self) -> int:
        """Forward passes of decode steps so far."""
        return self.decoder.passes

    @property
    def batched_steps(self) -> int:
        """Decode steps those passes ran (their ratio to `batches` is the mean batch)."""
        return self.decoder.jobs_run

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
        held = sum(1 for s in self.sessions.values() if s.peer_id == peer_id)
        if held >= self.limits.max_sessions_per_peer:
            raise SessionRefused(ErrorCode.OVERLOADED, f"peer {peer_id} holds {held} sessions here, this node's limit "
                                 f"per peer; close one or go elsewhere", retry_elsewhere=True)
        view = self.span if (start, end) == (self.span.start, self.span.end) else self.span.sub_span(start, end)
        needed = view.cache_bytes(batch, max_length)
        self._evict_idle_for(needed)
        if len(self.sessions) >= self.limits.max_sessions:
            raise SessionRefused(ErrorCode.OVERLOADED, f"all {self.limits.max_sessions} session slots are taken",
                                 retry_elsewhere=True)
        if self.reserved_bytes + needed > self.limits.kv_cache_bytes:
            raise SessionRefused(ErrorCode.CACHE_FULL,
                                 f"session needs {needed} bytes of KV cache; {self.limits.kv_cache_bytes - self.reserved_bytes} free",
                                 retry_elsewhere=True)
        session = ServedSession(session_id, peer_id, self.span, view, view.new_cache(batch, max_length))
        self.sessions[session_id] = session
        self.reserved_bytes += session.nbytes
        return session

    def _evict_idle_for(self, needed: int) -> None:
        """Evict sessions idle at least `evict_idle_s` until a slot is free and `needed` bytes fit:
        first those of the peers holding the most sessions, then the longest idle."""
        now = trio.current_time()
        held: dict[str, int] = {}
        for s in self.sessions.values():
            held[s.peer_id] = held.get(s.peer_id, 0) + 1
        idle = sorted((s for s in self.sessions.values() if now - s.last_active >= self.limits.evict_idle_s),
                      key=lambda s: (-held[s.peer_id], s.last_active))
        for session in idle:
            if (self.reserved_bytes + needed <= self.limits.kv_cache_bytes
                    and len(self.sessions) < self.limits.max_sessions):
                return
            self.end(session, SessionRefused(ErrorCode.CACHE_FULL, "session evicted to make room on this node "
                                             "(it was idle); replay elsewhere", retry_elsewhere=True))

    def end(self, session: ServedSession, reason: SessionRefused) -> None:
        """End `session` on the node's initiative; its stream tells the client `reason`."""
        session.ended = reason
        self.close(session)
        self.on_end(session)

    def close(self, session: ServedSession) -> None:
        if self.sessions.pop(session.session_id, None) is not None:
            self.reserved_bytes -= session.nbytes

    def check_input(self, session: ServedSession, shape: tuple[int, ...], start_position: int, *,
                    rewind: bool = False) -> None:
        """What a step's hidden states may be, checked on the tensor's header before a byte of it is
        decompressed or decoded: [the session's batch, tokens that fit its room, the hidden size],
        starting where the session ends, or before that when the step says it rewinds."""
        cache, hidden = session.cache, self.span.config.hidden_size
        if len(shape) != 3 or shape[0] != cache.batch or shape[1] < 1 or shape[2] != hidden:
            raise SessionRefused(ErrorCode.INVALID_TENSOR,
                                 f"hidden states must be [{cache.batch}, tokens, {hidden}], got {list(shape)}")
        if start_position > cache.length:
            raise SessionRefused(ErrorCode.POSITION_MISMATCH,
                                 f"step starts at position {start_position} but the cache holds {cache.length}")
        if start_position < cache.length and not rewind:
            raise SessionRefused(ErrorCode.POSITION_MISMATCH,
                                 f"step starts at position {start_position} but the cache holds {cache.length}; "
                                 f"a step that goes back must say rewind")
        if start_position + shape[1] > cache.max_length:
            raise SessionRefused(ErrorCode.CACHE_FULL, f"{shape[1]} tokens at position {start_position} overflow "
                                 f"the session's {cache.max_length} positions")

    async def step(self, session: ServedSession, hidden: np.ndarray, start_position: int,
                   chunks: tuple[int, ...] = (), *, rewind: bool = False) -> tuple[np.ndarray, float]:
        """Run the session's blocks on `hidden` [B, T, D] at `start_position`, as `chunks` (token
        counts, run one after another) when given; returns (output, seconds of compute). A step
        that `rewind`s may start before the session's end: the positions from there are forgotten."""
        if self.draining:
            raise SessionRefused(ErrorCode.SHUTTING_DOWN, "this node is shutting down; replay elsewhere",
                                 retry_elsewhere=True)
        self.check_input(session, hidden.shape, start_position, rewind=rewind)
        rows = hidden.shape[0] * hidden.shape[1]
        if hidden.shape[1] > ROW_EXACT_TOKENS:  # a token and its drafts cost at most 16 decode steps: free too
            self._charge_prefill(session.peer_id, rows)
        if rows <= self.limits.inline_max_tokens and len(chunks) <= 1:
            output, seconds = await self._decode(_Step(session, hidden, start_position))
        else:
            output, seconds = await self._prefill(session, hidden, start_position, chunks)
        if self.chaos is not None:
            output = await self.chaos.apply(output)
        session.steps += 1
        session.last_active = trio.current_time()
        return output, seconds

    def _charge_prefill(self, peer_id: str, tokens: int) -> None:
        """Pay for `tokens` of prefill from `peer_id`'s budget, or refuse the step: go elsewhere."""
        wait_s = self.prefill_budgets.charge(peer_id, tokens, trio.current_time())
        if wait_s > 0:
            per_minute = self.prefill_budgets.per_minute
            raise SessionRefused(ErrorCode.OVERLOADED,
                                 f"peer {peer_id} has used its prefill budget here ({per_minute} tokens a minute); "
                                 f"{min(tokens, per_minute)} tokens refill in {wait_s:.1f} s; go elsewhere",
                                 retry_elsewhere=True)

    async def _decode(self, step: _Step) -> tuple[np.ndarray, float]:
        root = step.session.root
        job = Job(step, key=root, rows=step.rows, max_rows=min(self.limits.max_batch_rows, root.batch_rows))
        expected = self._company(step.session)
        return await self.decoder.submit(
            job, company=lambda queue: expected <= {queued.payload.session for queued in queue},
            wait_s=self.limits.batch_wait_s if expected else 0.0)

    def _company(self, session: ServedSession) -> set[ServedSession]:
        """The other sessions on this span that stepped within `batch_window_s`: a decode step that
        finds the node idle waits (at most `batch_wait_s`) until each has a step queued too, so that
        one pass takes them all. None where rows cannot share a pass."""
        if session.root.batch_rows <= 1:
            return set()
        now = trio.current_time()
        return {s for s in self.sessions.values() if s is not session and s.root is session.root
                and s.steps > 0 and now - s.last_active <= self.limits.batch_window_s}

    async def _run_batch(self, jobs: list[Job]) -> None:
        """One forward pass for `jobs` (decode steps on one span); each gets (output, seconds) or its error."""
        started = trio.current_time()
        steps: list[_Step] = [job.payload for job in jobs]
        rows = sum(step.rows for step in steps)
        try:
            if self.limits.compute_in_thread and rows > self.limits.inline_max_batch_rows:
                outputs = await trio.to_thread.run_sync(_forward_batch, steps)
            else:
                outputs = _forward_batch(steps)
            widest = max((step.session.span for step in steps), key=_blocks)
            await _modelled_compute(widest, 1, (rows,))
        except Exception as err:  # noqa: BLE001 - handed to the step's own task, which raises it
            outputs = [err] * len(steps)
        seconds = trio.current_time() - started
        for job, step, output in zip(jobs, steps, outputs):
            if isinstance(output, Exception):
                job.error = output
            else:
                job.output = (output, seconds)
                self.tokens_served += step.rows
        self.compute_seconds += seconds

    async def _prefill(self, session: ServedSession, hidden: np.ndarray, start_position: int,
                       chunks: tuple[int, ...]) -> tuple[np.ndarray, float]:
        """Run `hidden` as `chunks`, one turn of the compute lock per `prefill_chunk_tokens` positions."""
        if sum(chunks or (0,)) not in (0, hidden.shape[1]):
            raise SessionRefused(ErrorCode.INVALID_MESSAGE,
                                 f"chunks {list(chunks)} do not add up to the step's {hidden.shape[1]} tokens")
        if start_position < session.cache.length:
            session.cache.truncate(start_position)  # a rewind (checked): the client kept fewer positions
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


def _blocks(span: Span) -> int:
    return span.end - span.start


def _forward(session: ServedSession, hidden: np.ndarray, passes: tuple[int, ...] = ()) -> np.ndarray:
    """The session's blocks on `hidden` [B, T, D], as forward passes of `passes` tokens each."""
    try:
        return session.span.run(hidden, session.cache, passes)
    except ShardError as err:
        raise SessionRefused(ErrorCode.INVALID_TENSOR, str(err)) from err


def _forward_batch(steps: list[_Step]) -> list[np.ndarray | Exception]:
    """Each step's output, from one forward pass over all of them when they can share one; a step
    the pass cannot take (bad shape, full cache) gets its own error and the others run without it."""
    for step in steps:
        if step.start_position < step.session.cache.length:
            step.session.cache.truncate(step.start_position)  # a rewind (checked): the client kept fewer positions
    if len(steps) == 1:
        try:
            return [_forward(steps[0].session, steps[0].hidden)]
        except SessionRefused as err:
            return [err]
    outputs = steps[0].session.root.run_batch(
        [BatchStep(step.hidden, step.session.cache, step.session.span.start, step.session.span.end) for step in steps])
    return [SessionRefused(ErrorCode.INVALID_TENSOR, str(out)) if isinstance(out, ShardError) else out
            for out in outputs]


async def _modelled_compute(span: Span, batch: int, chunks: tuple[int, ...]) -> None:
    """A span that models its compute time (the simulator's) waits it out here, in trio's clock:
    one forward pass per chunk, as `_forward` runs them. Real spans model none."""
    for tokens in chunks:
        seconds = span.modelled_seconds(batch, tokens)
        if seconds > 0:
            await sleep_until(trio.current_time() + seconds)
