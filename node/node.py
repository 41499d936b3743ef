"""A node: serves its span over a transport and keeps its announcement fresh in discovery.

Transport- and clock-agnostic, so the same code runs as the `hearth node` daemon over libp2p and
inside tests and the simulator over the in-memory transport.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection

import torch
import trio

from mesh.data_channel import DataChannels
from mesh.discovery import RECORD_TTL_S, REFRESH_EVERY_S, Discovery, PeerRecord
from mesh.transport import INFERENCE_PROTOCOL, INFO_PROTOCOL, Transport
from node.server import InferenceServer
from node.sessions import SessionLimits, SessionManager
from protocol import SpanInfo
from shard.span import SpanModel

log = logging.getLogger("hearth.node")


def measure_token_seconds(span: SpanModel, repeats: int = 3) -> float:
    """Seconds one decoded token takes through the whole span (median of a few decode steps)."""
    cache = span.new_cache(batch=1, max_length=repeats + 1)
    hidden = torch.zeros(1, 1, span.config.hidden_size)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        span(hidden, cache)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


class Node:
    def __init__(self, span: SpanModel, model_id: str, manifest_hash: str, *,
                 limits: SessionLimits = SessionLimits(), allowed_peers: Collection[str] | None = None,
                 wall_clock: Callable[[], float] = time.time, token_seconds: float | None = None,
                 record_ttl_s: float = RECORD_TTL_S, refresh_every_s: float = REFRESH_EVERY_S,
                 data_channels: DataChannels | None = None):
        self.span, self.model_id, self.manifest_hash = span, model_id, manifest_hash
        self.manager = SessionManager(span, limits)
        self.data_channels = data_channels
        self.server = InferenceServer(self.manager, self.span_info, allowed_peers=allowed_peers,
                                      data_channels=data_channels)
        self.wall_clock = wall_clock
        self.token_seconds = token_seconds if token_seconds is not None else measure_token_seconds(span)
        self.record_ttl_s, self.refresh_every_s = record_ttl_s, refresh_every_s
        self.transport: Transport | None = None
        self.discovery: Discovery | None = None
        self._stop = trio.Event()

    def span_info(self) -> SpanInfo:
        return SpanInfo(model_id=self.model_id, manifest_hash=self.manifest_hash, start=self.span.start,
                        end=self.span.end, quantization=self.span.quant,
                        throughput=1.0 / max(self.token_seconds, 1e-9),
                        free_cache_tokens=self.manager.free_cache_tokens)

    def record(self) -> PeerRecord:
        return PeerRecord(self.transport.peer_id, tuple(self.transport.addrs), self.span_info(),
                          self.wall_clock() + self.record_ttl_s)

    async def run(self, transport: Transport, discovery: Discovery, *,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `stop()`; then drain: withdraw the record, tell open sessions to go elsewhere."""
        self.transport, self.discovery = transport, discovery
        transport.set_handler(INFERENCE_PROTOCOL, self.server.handle_inference)
        transport.set_handler(INFO_PROTOCOL, self.server.handle_info)
        async with trio.open_nursery() as nursery:
            if self.data_channels is not None:
                await nursery.start(self.data_channels.serve)
            await self._announce()
            nursery.start_soon(self._refresh_loop)
            task_status.started()
            await self._stop.wait()
            nursery.cancel_scope.cancel()
        await self._drain()

    def stop(self) -> None:
        self._stop.set()

    async def _refresh_loop(self) -> None:
        while True:
            await trio.sleep(self.refresh_every_s)
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
