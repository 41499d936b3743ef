"""Inference sessions on a node: admission (limits, KV-cache budget), positions, and the compute.

A session holds a KV cache for a sub-range of the node's span. Opening reserves the cache's bytes
against the node's budget up front, so a node never runs out of memory mid-answer; closing (or
the session's stream ending for any reason) gives them back. Compute runs in a worker thread,
one forward pass at a time, so the event loop keeps answering pings and other sessions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import trio

from protocol import Codec, ErrorCode
from shard.errors import ShardError
from shard.kv_cache import KVCache
from shard.span import SpanModel


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
    evict_idle_s: float = 30.0  # a session idle this long may be evicted to make room for a new one


class ServedSession:
    def __init__(self, session_id: str, peer_id: str, span: SpanModel, cache: KVCache):
        self.session_id, self.peer_id = session_id, peer_id
        self.span, self.cache = span, cache
        self.steps = 0
        self.codec = Codec.FP32  # what step results are encoded with (the client's choice)
        self.last_active = trio.current_time()
        self.evicted = False

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes


class SessionManager:
    def __init__(self, span: SpanModel, limits: SessionLimits):
        self.span, self.limits = span, limits
        self.sessions: dict[str, ServedSession] = {}
        self.reserved_bytes = 0
        self.draining = False
        self.compute_lock = trio.Lock()
        self.tokens_served = 0
        self.compute_seconds = 0.0
        self.on_evict: Callable[[ServedSession], None] = lambda session: None

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
        session = ServedSession(session_id, peer_id, view, view.new_cache(batch, max_length))
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
            session.evicted = True
            self.close(session)
            self.on_evict(session)

    def close(self, session: ServedSession) -> None:
        if self.sessions.pop(session.session_id, None) is not None:
            self.reserved_bytes -= session.nbytes

    async def step(self, session: ServedSession, hidden: np.ndarray, start_position: int,
                   chunks: tuple[int, ...] = ()) -> tuple[np.ndarray, float]:
        """Run the session's blocks on `hidden` [B, T, D] at `start_position`, as `chunks` (token
        counts, run one after another) when given; returns (output, seconds)."""
        if self.draining:
            raise SessionRefused(ErrorCode.SHUTTING_DOWN, "this node is shutting down; replay elsewhere",
                                 retry_elsewhere=True)
        cache = session.cache
        if start_position > cache.length:
            raise SessionRefused(ErrorCode.POSITION_MISMATCH,
                                 f"step starts at position {start_position} but the cache holds {cache.length}")
        async with self.compute_lock:
            started = trio.current_time()
            if self.limits.compute_in_thread and hidden.shape[0] * hidden.shape[1] > self.limits.inline_max_tokens:
                output = await trio.to_thread.run_sync(self._forward, session, hidden, start_position, chunks)
            else:
                output = self._forward(session, hidden, start_position, chunks)
            await _modelled_compute(session.span, hidden.shape[0], chunks or (hidden.shape[1],))
            seconds = trio.current_time() - started
        session.steps += 1
        session.last_active = trio.current_time()
        self.tokens_served += hidden.shape[0] * hidden.shape[1]
        self.compute_seconds += seconds
        return output, seconds

    @staticmethod
    def _forward(session: ServedSession, hidden: np.ndarray, start_position: int,
                 chunks: tuple[int, ...] = ()) -> np.ndarray:
        cache = session.cache
        if start_position < cache.length:
            cache.truncate(start_position)  # the client redoes a step whose result it lost
        inputs = torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32))
        try:
            outputs = [session.span(part, cache) for part in inputs.split(list(chunks) or [inputs.shape[1]], dim=1)]
        except ShardError as err:
            raise SessionRefused(ErrorCode.INVALID_TENSOR, str(err)) from err
        return torch.cat(outputs, dim=1).to(torch.float32).numpy()


async def _modelled_compute(span: SpanModel, batch: int, chunks: tuple[int, ...]) -> None:
    """A span that models its compute time (the simulator's) waits it out here, in trio's clock:
    one forward pass per chunk, as `_forward` runs them.

    Real spans have no `compute_delay`, so for them this does nothing.
    """
    delay = getattr(span, "compute_delay", None)
    if delay is not None:
        for tokens in chunks:
            await delay(batch * tokens)
