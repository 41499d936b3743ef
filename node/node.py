"""A node: serves its span over a transport and keeps its announcement fresh in discovery.

Transport- and clock-agnostic, so the same code runs as the `hearth node` daemon over libp2p and
inside tests and the simulator over the in-memory transport.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection

import numpy as np
import trio

from mesh import virtual_time
from mesh.data_channel import DataChannels
from mesh.discovery import RECORD_TTL_S, REFRESH_EVERY_S, Discovery, PeerRecord
from mesh.swarm_secret import SwarmSecret
from mesh.transport import Transport
from node.chaos import Chaos
from node.metrics import NodeMetrics
from node.rebalance import BalanceSettings, Rebalancer
from node.piece_server import PieceServer, UploadLimits
from node.server import InferenceServer
from node.sessions import SessionLimits, SessionManager, SessionRefused
from protocol import INFERENCE_PROTOCOL, INFO_PROTOCOL, PIECES_PROTOCOL, ErrorCode, SpanInfo
from shard.compute import kernel_signature
from shard.interfaces import Span
from shard.piece_store import Pieces

log = logging.getLogger("hearth.node")


def quantization_name(span: Span) -> str:
    """How a span is quantized, as its record says: none, int8, int4 (groups of 32), int4-g64, int4-g128."""
    group = getattr(span, "group_size", 32)  # the simulator's stand-in spans have none
    return f"{span.quant}-g{group}" if span.quant == "int4" and group != 32 else span.quant


def measure_token_seconds(span: Span, repeats: int = 3) -> float:
    """Seconds one decoded token takes through the whole span (median of a few decode steps)."""
    cache = span.new_cache(batch=1, max_length=repeats + 1)
    hidden = np.zeros((1, 1, span.config.hidden_size), dtype=np.float32)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        span.run(hidden, cache)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


class Node:
    def __init__(self, span: Span, model_id: str, manifest_hash: str, *,
                 limits: SessionLimits = SessionLimits(), allowed_peers: Collection[str] | None = None,
                 wall_clock: Callable[[], float] = time.time, token_seconds: float | None = None,
                 record_ttl_s: float = RECORD_TTL_S, refresh_every_s: float = REFRESH_EVERY_S,
                 data_channels: DataChannels | None = None, balance: BalanceSettings | None = None,
                 load_span: Callable[[int, int], Awaitable[Span]] | None = None, seed: int | str = 0,
                 metrics: NodeMetrics | None = None, chaos: Chaos | None = None,
                 swarm_secret: SwarmSecret | None = None, kernels: str | None = None,
                 pieces: Pieces | None = None, upload: UploadLimits = UploadLimits()):
        self.span, self.model_id, self.manifest_hash = span, model_id, manifest_hash
        # what computes the span, in its span info (spot checks between equal kernels are exact); this process's by default
        self.kernels = kernel_signature() if kernels is None else kernels
        self.manager = SessionManager(span, limits, chaos=chaos)  # chaos: faults on purpose (`node.chaos`)
        self.data_channels = data_channels
        self.metrics = metrics if metrics is not None else NodeMetrics()
        self.pieces, self.upload = pieces, upload  # the model's pieces served to peers fetching it (node.piece_server)
        self.server = InferenceServer(self.manager, self.span_info, allowed_peers=allowed_peers,
                                      data_channels=data_channels, metrics=self.metrics,
                                      swarm_secret=swarm_secret)  # household mode: mesh.swarm_secret
        self.wall_clock = wall_clock
        self.token_seconds = token_seconds if token_seconds is not None else measure_token_seconds(span)
        self.metrics.watch(self)
        self.record_ttl_s, self.refresh_every_s = record_ttl_s, refresh_every_s
        self._info_key: tuple | None = None
        self._info: SpanInfo | None = None
        self.transport: Transport | None = None
        self.discovery: Discovery | None = None
        self._stop = trio.Event()
        self._nursery: trio.Nursery | None = None
        if (balance is None) != (load_span is None):
            raise ValueError("rebalancing needs both balance settings and a way to load spans")
        self.load_span = load_span
        self.rebalancer = None if balance is None else Rebalancer(self, balance, random.Random(seed), self.move_to)

    def span_info(self) -> SpanInfo:
        """What this node serves and how loaded it is (the same object while nothing changed: a
        client plans on a thousand of them and rebuilds its view only of those that did)."""
        span, manager = self.span, self.manager
        key = (span.start, span.end, span.quant, self.token_seconds, manager.free_cache_tokens, len(manager.sessions),
               self.kernels)
        if key != self._info_key:
            self._info_key = key
            self._info = SpanInfo(model_id=self.model_id, manifest_hash=self.manifest_hash, start=key[0], end=key[1],
                                  quantization=quantization_name(span), throughput=1.0 / max(key[3], 1e-9),
                                  free_cache_tokens=key[4], sessions=key[5], kernels=self.kernels)
        return self._info

    def record(self) -> PeerRecord:
        return PeerRecord(self.transport.peer_id, tuple(self.transport.addrs), self.span_info(),
                          self.wall_clock() + self.record_ttl_s)

    async def run(self, transport: Transport, discovery: Discovery, *,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `stop()`; then drain: withdraw the record, tell open sessions to go elsewhere."""
        self.transport, self.discovery = transport, discovery
        self.server.identify(transport.peer_id)
        transport.set_handler(INFERENCE_PROTOCOL, self.server.handle_inference)
        transport.set_handler(INFO_PROTOCOL, self.server.handle_info)
        if self.pieces is not None:
            uploads = PieceServer(self.pieces, self.server.hello, admit=self.server.admit, stream=self.server.stream,
                                  limits=self.upload, tamper=self.manager.chaos.tamper if self.manager.chaos else None)
            transport.set_handler(PIECES_PROTOCOL, uploads.handle)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.data_channels is not None:
                await nursery.start(self.data_channels.serve)
            await self._announce()
            nursery.start_soon(self._refresh_loop)
            if self.rebalancer is not None:
                nursery.start_soon(self.rebalancer.run)
            task_status.started()
            await self._stop.wait()
            nursery.cancel_scope.cancel()
        await self._drain()

    def stop(self) -> None:
        self._stop.set()

    async def move_to(self, start: int, end: int) -> None:
        """Serve blocks [start, end) instead: load them, announce them, then retire the old span
        (its open sessions may finish within the grace period; then they are told to go elsewhere)."""
        if self.rebalancer is None:
            raise RuntimeError("only a node started with balance settings and a span loader can move")
        old = self.span
        span = await self.load_span(start, end)
        self.span = self.manager.span = span
        self.token_seconds = self.rebalancer.settings.block_seconds * (end - start)
        self.metrics.moved()
        await self._announce()
        self._nursery.start_soon(self._retire, old)

    async def _retire(self, old: Span) -> None:
        def on_old():
            return [s for s in self.manager.sessions.values() if s.root is old]

        with trio.move_on_after(self.rebalancer.settings.grace_s):
            while on_old():
                await trio.sleep(1.0)
        reason = SessionRefused(ErrorCode.SPAN_NOT_SERVED, f"this node moved to blocks [{self.span.start}, "
                                f"{self.span.end}); replay elsewhere", retry_elsewhere=True)
        for session in on_old():
            self.manager.end(session, reason)

    async def announce_now(self) -> None:
        """Publish the record now (the host's addresses changed, say), not at the next refresh."""
        await self._announce()

    async def _refresh_loop(self) -> None:
        while True:
            await virtual_time.sleep(self.refresh_every_s)  # trio.sleep, or a simulator's cheaper timers
            await self._announce()

    async def _announce(self) -> None:
        try:
            with trio.fail_after(max(self.refresh_every_s, 5.0)):
                await self.discovery.announce(self.record())
        except (trio.TooSlowError, OSError, RuntimeError) as err:
            log.warning("announcement failed (will retry): %r", err)

    async def _drain(self) -> None:
        self.server.drain()
        with trio.move_on_after(5.0):
            try:
                await self.discovery.withdraw(self.transport.peer_id, self.manifest_hash)
            except (OSError, RuntimeError) as err:
                log.warning("withdrawing the announcement failed: %r", err)
        with trio.move_on_after(2.0):  # let refused sessions get their error replies out
            while self.manager.sessions:
                await trio.sleep(0.01)
