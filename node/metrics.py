"""Prometheus metrics of a node and of an API server, each in a registry of its own.

A process may hold many nodes (tests, the simulator), so nothing goes in prometheus_client's global
registry. What the serving code counts, it counts through the small methods here (`session_opened`,
`step`, ...), so `node.server` and `node.api` never name a metric; what is state rather than an
event (sessions open, KV bytes reserved, tokens served) is read from the node at scrape time.

`node.metrics_http` serves them: beside the API, or alone (`hearth node --metrics-port`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mesh.discovery import Discovery, PeerRecord
from node.sessions import SessionManager
from protocol import ErrorCode, Step, StepResult
from shard.interfaces import ROW_EXACT_TOKENS, Span

disable_created_metrics()  # no `_created` series beside each counter: Prometheus has no use for them

COMPUTE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LOOKUP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INTER_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Serving(Protocol):
    """What the metrics read of a node (`node.node.Node`) at scrape time."""

    span: Span
    manager: SessionManager
    token_seconds: float


def _code(code: ErrorCode | int) -> str:
    """An error code as a label: its name (`shutting_down`), or the number of one we do not know."""
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return str(int(code))


class NodeMetrics:
    """What a node serving a span counts. `watch(node)` adds the state read at scrape time."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.sessions_opened = Counter("hearth_sessions_opened", "Inference sessions opened on this node", registry=r)
        self.sessions_refused = Counter(
            "hearth_sessions_refused", "Session requests refused before a session opened, by error code",
            ["code"], registry=r)
        self.sessions_ended = Counter(
            "hearth_sessions_ended_by_node", "Open sessions this node ended before their client closed them "
            "(evicted, idle, draining, moved, bad data): each is a failover its client suffers", ["code"], registry=r)
        self.failovers_served = Counter(
            "hearth_failovers_served", "Sessions that rebuilt a failed node's cache from a client's replay", registry=r)
        self.steps = Counter("hearth_steps", "Steps computed, by kind (decode: one token; prefill: a session's "
                             "first step or a longer one; speculative: a later step of 2-16 tokens, a token and "
                             "its drafts; replay)", ["kind"], registry=r)
        self.step_tokens = Counter("hearth_step_tokens", "Token positions computed in steps", registry=r)
        self.compute_seconds = Histogram("hearth_step_compute_seconds", "Compute time of one step through the span",
                                         buckets=COMPUTE_BUCKETS, registry=r)
        self.activation_bytes = Counter(
            "hearth_activation_bytes", "Encoded activation bytes, by direction (in, out) and wire codec",
            ["direction", "codec"], registry=r)
        self.rebalance_moves = Counter("hearth_rebalance_moves", "Times this node moved to other blocks", registry=r)
        self.lookup_seconds = lookup_histogram(r)

    def watch(self, node: Serving) -> None:
        self.registry.register(_NodeState(node))

    # --- events, called by the serving code ---------------------------------------------------

    def session_opened(self) -> None:
        self.sessions_opened.inc()

    def session_refused(self, code: ErrorCode | int, *, opened: bool) -> None:
        (self.sessions_ended if opened else self.sessions_refused).labels(_code(code)).inc()

    def step(self, message: Step, result: StepResult, *, first: bool) -> None:
        tokens = message.hidden.shape[1] if len(message.hidden.shape) > 1 else 1
        kind = "replay" if message.replay else "decode" if tokens == 1 else \
            "speculative" if not first and tokens <= ROW_EXACT_TOKENS else "prefill"
        if message.replay and first:
            self.failovers_served.inc()
        self.steps.labels(kind).inc()
        self.step_tokens.inc(tokens * (message.hidden.shape[0] if message.hidden.shape else 1))
        self.compute_seconds.observe(result.compute_seconds)
        for direction, wire in (("in", message.hidden), ("out", result.hidden)):
            self.activation_bytes.labels(direction, wire.codec.value).inc(len(wire.data) + len(wire.scales))

    def moved(self) -> None:
        self.rebalance_moves.inc()


class _NodeState(Collector):
    """Gauges of what a node holds now, read when Prometheus scrapes."""

    def __init__(self, node: Serving):
        self.node = node

    def collect(self) -> Iterator:
        node, manager = self.node, self.node.manager
        span = node.span
        yield _gauge("hearth_sessions_open", "Inference sessions open now", len(manager.sessions))
        yield _gauge("hearth_kv_cache_reserved_bytes", "KV-cache bytes reserved by open sessions",
                     manager.reserved_bytes)
        yield _gauge("hearth_kv_cache_budget_bytes", "KV-cache bytes this node may reserve",
                     manager.limits.kv_cache_bytes)
        span_info = GaugeMetricFamily("hearth_span_blocks", "The blocks this node serves: [start, end)",
                                      labels=["bound"])
        span_info.add_metric(["start"], span.start)
        span_info.add_metric(["end"], span.end)
        yield span_info
        yield _gauge("hearth_span_tokens_per_second", "Decode tokens per second through the whole span, as measured",
                     1.0 / max(node.token_seconds, 1e-9))
        served = CounterMetricFamily("hearth_tokens_served", "Token rows computed by batched decode steps")
        served.add_metric([], manager.tokens_served)
        yield served
        batches = CounterMetricFamily("hearth_decode_batches", "Decode passes run (several sessions may share one)")
        batches.add_metric([], manager.batches)
        yield batches
        if manager.chaos is not None:  # `hearth node --chaos`: this node misbehaves on purpose
            chaos = GaugeMetricFamily("hearth_chaos_enabled", "1: this node injects faults on purpose "
                                      "(hearth node --chaos), by kind", labels=["kind"])
            chaos.add_metric([manager.chaos.spec.kind], 1)
            yield chaos
            corrupted = CounterMetricFamily("hearth_chaos_corrupted_steps", "Step outputs this node corrupted on purpose")
            corrupted.add_metric([], manager.chaos.steps_corrupted)
            yield corrupted


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def lookup_histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram("hearth_dht_lookup_seconds", "Time of one discovery lookup, by result", ["result"],
                     buckets=LOOKUP_BUCKETS, registry=registry)


class TimedDiscovery(Discovery):
    """A discovery whose lookups are timed into a `lookup_histogram`."""

    def __init__(self, inner: Discovery, seconds: Histogram, clock: Callable[[], float] = time.perf_counter):
        self.inner, self.seconds, self.clock = inner, seconds, clock

    async def announce(self, record: PeerRecord) -> None:
        await self.inner.announce(record)

    async def withdraw(self, peer_id: str, model_key: str) -> None:
        await self.inner.withdraw(peer_id, model_key)

    async def lookup(self, model_key: str) -> list[PeerRecord]:
        started, result = self.clock(), "error"
        try:
            records = await self.inner.lookup(model_key)
            result = "ok"
            return records
        finally:
            self.seconds.labels(result).observe(self.clock() - started)

    def __getattr__(self, name: str):  # the rest of the inner discovery's face (its peer cache, say)
        return getattr(self.inner, name)


class ApiMetrics:
    """What an API server counts: requests, tokens, time to first token and between tokens, errors."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("hearth_api_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("hearth_api_prompt_tokens", "Prompt tokens of generations", registry=r)
        self.completion_tokens = Counter("hearth_api_completion_tokens", "Tokens generated", registry=r)
        self.generations = Counter("hearth_api_generations", "Generations ended, by how (finish reason, stopped, failed)",
                                   ["outcome"], registry=r)
        self.first_token_seconds = Histogram("hearth_api_time_to_first_token_seconds",
                                             "From a request's arrival to its first token", buckets=FIRST_TOKEN_BUCKETS,
                                             registry=r)
        self.inter_token_seconds = Histogram("hearth_api_inter_token_seconds", "Between consecutive tokens of an answer",
                                             buckets=INTER_TOKEN_BUCKETS, registry=r)
        self.errors = Counter("hearth_api_errors", "Error answers, by OpenAI error type and code", ["type", "code"],
                              registry=r)
        self.failovers = Counter("hearth_api_failovers", "Hops replaced mid-answer (the client replayed their history)",
                                 registry=r)

    def watch_active(self, active: Callable[[], int]) -> None:
        self.registry.register(_Active(active))


class _Active(Collector):
    def __init__(self, active: Callable[[], int]):
        self.active = active

    def collect(self) -> Iterator:
        yield _gauge("hearth_api_generations_active", "Generations running now", self.active())
