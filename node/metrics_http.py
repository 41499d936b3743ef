"""`/metrics` over HTTP, in Prometheus' text format: an endpoint for the API's app, or a server of
its own (`hearth node --metrics-port`)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from node.http_guard import OriginGuard


def metrics_endpoint(registry: CollectorRegistry) -> Callable:
    """The `/metrics` handler (a Starlette endpoint) for one registry."""
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return metrics


async def serve_metrics(registry: CollectorRegistry, host: str, port: int, shutdown: Callable[[], Awaitable[None]], *,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """`/metrics` alone on HOST:PORT until `shutdown()` returns; reports its URL once listening.
    Web pages of other origins and rebound host names are refused, as on the API."""
    app = Starlette(routes=[Route("/metrics", metrics_endpoint(registry), methods=["GET"])],
                    middleware=[Middleware(OriginGuard, bind_host=host)])
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.errorlog = logging.getLogger("hearth.metrics.http")
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(hypercorn_serve, app, config, shutdown_trigger=shutdown))
        task_status.started(f"{binds[0]}/metrics")
