"""The OpenAI-compatible HTTP API: a Starlette app answering through a `mesh.Client`, served by
Hypercorn's trio worker inside the caller's trio run (the node daemon's, or `hearth api`'s).

Routes: `GET /v1/models`, `GET /v1/models/{model}`, `POST /v1/chat/completions` and
`POST /v1/completions`; besides OpenAI's, the chat page (`/`), the swarm page (`/swarm`) and its
data (`GET /api/swarm`, `node.swarm_view`), and `GET /metrics` (Prometheus, `node.metrics`). The
formats live in `node.openai_format`; this module does the I/O: who may call (`node.http_guard`:
Host, origin and content type; bearer-token auth), reading the body (bounded in size and time),
encoding the prompt with the model's tokenizer and chat template, checking that some route covers
the model (503 naming the missing blocks otherwise), then running the generation as one JSON answer
or as server-sent events. The last chunk of an answer (and a whole answer) carries a `hearth`
object: the route it took and the failovers it survived.

A generation is the client's async generator, closed on every way out of a request. An HTTP client
that goes away mid-answer cancels its request (Starlette's disconnect listener for streams, ours for
plain answers), and closing the generator closes the session on every hop.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import trio
from prometheus_client import CollectorRegistry
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mesh.client import Client, GenerationReport
from mesh.pipeline import GenerationFailed
from mesh.routing import NoRouteError
from mesh.session import HopFailed
from node import openai_format as fmt
from node.http_guard import OriginGuard
from node.metrics import ApiMetrics
from node.metrics_http import metrics_endpoint
from node.openai_format import ApiError, CompletionRequest, ResponseHeader
from node.swarm_view import SwarmWatch
from node.web_pages import page_routes, public_paths
from shard.errors import ChatTemplateError, InvalidInput, PromptTooLong, ShardError, TokenizerFileError
from shard.generate import Emitted
from shard.gguf_file import is_gguf
from shard.tokenizer import TOKENIZER_FILE

log = logging.getLogger("hearth.api")
T = TypeVar("T")

MAX_BODY_BYTES = 4 << 20
BODY_TIMEOUT_S = 30.0  # to receive a whole request body
PLAN_TIMEOUT_S = 15.0  # to find out whether any route covers the model
SEND_TIMEOUT_S = 60.0  # for an HTTP client to take one more chunk of its stream
GRACEFUL_SHUTDOWN_S = 2.0  # requests still running then are cancelled (their hops closed)
DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_CONCURRENT = 8  # generations at once; more get 429 (each holds a session on every hop)
PROMPT_CHARS_PER_POSITION = 32  # a prompt longer than this many characters per context position cannot fit
TOKENIZING_THREADS = 2  # prompts tokenized (and templated) at once, off the event loop
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ApiSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    default_max_tokens: int = DEFAULT_MAX_TOKENS  # when a request gives no max_tokens
    max_concurrent: int = DEFAULT_MAX_CONCURRENT

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidInput(f"the API port must be in 0..65535, got {self.port}")
        if self.default_max_tokens < 1:
            raise InvalidInput(f"the default max_tokens must be positive, got {self.default_max_tokens}")
        if self.max_concurrent < 1:
            raise InvalidInput(f"the cap on concurrent generations must be positive, got {self.max_concurrent}")
        if self.api_key is not None and not self.api_key.strip():
            raise InvalidInput("the API key must not be empty")
        if self.api_key is None and not is_loopback(self.host):
            raise InvalidInput(f"refusing to serve the API on {self.host}, beyond this machine, without "
                               f"authentication: give an API key (--api-key), or bind 127.0.0.1")

    @property
    def bind(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_model_dir(model_dir: str | Path) -> None:
    """Fail before any network when the model cannot serve the API (it needs a tokenizer: a GGUF
    file carries its own)."""
    if not is_gguf(model_dir) and not (Path(model_dir) / TOKENIZER_FILE).is_file():
        raise InvalidInput(f"the API needs the model's {TOKENIZER_FILE} in {model_dir}")


class ApiServer:
    """The API over one `Client`. `await nursery.start(server.run)` gives its base URL; `stop()` ends it."""

    def __init__(self, client: Client, settings: ApiSettings, *, wall_clock: Callable[[], float],
                 registry: CollectorRegistry | None = None):
        if client.tokenizer is None:
            raise InvalidInput(f"the API needs the model's {TOKENIZER_FILE} in {client.model_dir}")
        self.client, self.settings, self.wall_clock = client, settings, wall_clock
        self.model = client.model_id
        self.created = int(wall_clock())
        self.active = 0  # generations admitted and not yet ended
        self._tokenizing = trio.CapacityLimiter(TOKENIZING_THREADS)
        self.metrics = ApiMetrics(registry)  # a node's API shares the node's registry: one /metrics
        self.metrics.watch_active(lambda: self.active)
        self.watch = SwarmWatch(client, wall_clock=wall_clock)
        self._stop = trio.Event()
        public = public_paths()
        middleware = [Middleware(RequestCounter, metrics=self.metrics),
                      Middleware(OriginGuard, bind_host=settings.host, pages=public, on_error=self._count_error)]
        if settings.api_key:
            middleware.append(Middleware(BearerAuth, api_key=settings.api_key, public=public,
                                         on_error=self._count_error))
        self.app = Starlette(
            routes=[Route("/v1/models", self.list_models, methods=["GET"]),
                    Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
                    Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                    Route("/v1/completions", self.completions, methods=["POST"]),
                    Route("/api/swarm", self.swarm, methods=["GET"]),
                    Route("/metrics", metrics_endpoint(self.metrics.registry), methods=["GET"]),
                    *page_routes()],
            middleware=middleware,
            exception_handlers={ApiError: self._api_error, HTTPException: self._http_error,
                                ClientGone: _client_gone, ClientDisconnect: _client_gone,
                                Exception: self._internal_error})

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `stop()`; reports the base URL (`http://HOST:PORT/v1`) once listening."""
        config = HypercornConfig()
        config.bind = [self.settings.bind]
        config.graceful_timeout = GRACEFUL_SHUTDOWN_S
        config.errorlog = logging.getLogger("hearth.api.http")
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(hypercorn_serve, self.app, config, shutdown_trigger=self._stop.wait))
            task_status.started(f"{binds[0]}/v1")
            if self.client.options.keep_sessions_s > 0:
                expiry = trio.CancelScope()
                nursery.start_soon(self._expire_kept_routes, expiry)
                await self._stop.wait()
                expiry.cancel()
        with trio.CancelScope(shield=True):
            await self.client.aclose()  # the routes kept for prefix reuse

    async def _expire_kept_routes(self, scope: trio.CancelScope) -> None:
        """Close the routes kept for prefix reuse once their time is up, between requests too."""
        with scope:
            while True:
                await trio.sleep(max(1.0, self.client.options.keep_sessions_s / 4))
                await self.client.kept.expire()

    def stop(self) -> None:
        self._stop.set()

    # --- routes ---------------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        return JSONResponse(fmt.model_list(self.model, self.created))

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name != self.model:
            raise ApiError(404, f"The model '{name}' does not exist.", param="model", code="model_not_found")
        return JSONResponse(fmt.model_card(self.model, self.created))

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, fmt.parse_chat_request(await read_json(request), self.model),
                                    "chatcmpl-")

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, fmt.parse_completion_request(await read_json(request), self.model),
                                    "cmpl-")

    async def swarm(self, request: Request) -> Response:
        """The peers serving this model, probed now, and what changed lately (the swarm page's data)."""
        try:
            return JSONResponse(await self.watch.snapshot(), headers={"Cache-Control": "no-store"})
        except trio.TooSlowError as err:
            raise ApiError(503, "surveying the swarm took too long", type="server_error", code="timeout") from err

    # --- generation -----------------------------------------------------------------------------

    async def _complete(self, request: Request, parsed: CompletionRequest, id_prefix: str) -> Response:
        if self.active >= self.settings.max_concurrent:
            raise ApiError(429, f"this server runs at most {self.settings.max_concurrent} generations at once; "
                           f"retry in {RETRY_AFTER_S} s", type="requests", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        self.active += 1
        streaming = False
        try:
            arrived = trio.current_time()
            header = ResponseHeader(id_prefix + secrets.token_hex(12), int(self.wall_clock()), self.model, parsed.chat)
            ids = await trio.to_thread.run_sync(self._encode, parsed, limiter=self._tokenizing)
            context = self.client.config.max_position_embeddings
            params = parsed.sampling(fmt.max_new_tokens(parsed, len(ids), context, self.settings.default_max_tokens))
            log.info("%s: %d prompt tokens, up to %d new, stream=%s", header.id, len(ids), params.max_new_tokens,
                     parsed.stream)
            await self._check_route()
            report = GenerationReport(ids)
            self.metrics.prompt_tokens.inc(len(ids))
            tokens = self._observed(self.client.generate(prompt_ids=ids, params=params, report=report), report, arrived)
            if not parsed.stream:
                return await self._answer(request, header, tokens, report)
            first = await _first_token(request, tokens)
            streaming = True
        finally:
            if not streaming:
                self.active -= 1
        return EventStreamResponse(self._events(header, parsed, first, tokens, report),
                                   on_close=partial(self._stream_closed, tokens))

    async def _observed(self, tokens: AsyncIterator[Emitted], report: GenerationReport,
                        arrived: float) -> AsyncIterator[Emitted]:
        """`tokens`, timed and counted: time to first token, between tokens, how the generation
        ended, and the failovers it survived (also shown on the swarm page)."""
        outcome, last = "stopped", None
        try:
            async with aclosing(tokens):
                async for emitted in tokens:
                    now = trio.current_time()
                    if last is None:
                        self.metrics.first_token_seconds.observe(now - arrived)
                    else:
                        self.metrics.inter_token_seconds.observe(now - last)
                    last = now
                    self.metrics.completion_tokens.inc()
                    yield emitted
            outcome = report.finish_reason
        except Exception:
            outcome = "failed"
            raise
        finally:
            self.metrics.generations.labels(outcome).inc()
            for recovery in report.recoveries:
                self.metrics.failovers.inc()
                self.watch.failover(recovery)

    async def _stream_closed(self, tokens: AsyncIterator[Emitted]) -> None:
        await tokens.aclose()  # already closed unless the events never started
        self.active -= 1

    def _encode(self, parsed: CompletionRequest) -> list[int]:
        """The prompt's token ids (in a worker thread: a long prompt takes seconds to tokenize)."""
        messages = list(parsed.messages) if parsed.messages is not None else None
        prompt_ids = list(parsed.prompt_ids) if parsed.prompt_ids is not None else None
        context = self.client.config.max_position_embeddings
        chars = len(parsed.prompt or "") + sum(len(str(m.get("content") or "")) for m in messages or ())
        if chars > PROMPT_CHARS_PER_POSITION * context:
            raise fmt.invalid(parsed.prompt_param, f"the prompt has {chars} characters: more than this model's "
                              f"context of {context} tokens could hold", "context_length_exceeded")
        try:
            ids = self.client.encode_prompt(parsed.prompt, prompt_ids, messages)
        except (ChatTemplateError, InvalidInput, TokenizerFileError) as err:
            raise fmt.invalid(parsed.prompt_param, str(err)) from err
        vocab = self.client.config.vocab_size
        if any(i >= vocab for i in ids):
            raise fmt.invalid("prompt", f"token id {max(ids)} is outside the vocabulary of {vocab}")
        return ids

    async def _check_route(self) -> None:
        """Fail fast with 503 when no route covers the model (the client itself would wait for one)."""
        try:
            with trio.fail_after(PLAN_TIMEOUT_S):
                await self.client.plan()
        except NoRouteError as err:
            raise _unavailable(err) from err
        except trio.TooSlowError as err:
            raise ApiError(503, f"looking for nodes serving {self.model} took over {PLAN_TIMEOUT_S:g} s",
                           type="server_error", code="no_route") from err

    async def _answer(self, request: Request, header: ResponseHeader, tokens: AsyncIterator[Emitted],
                      report: GenerationReport) -> Response:
        """Run the whole generation (stopped if the HTTP client goes away first), then answer."""
        async def drain() -> None:
            async with aclosing(tokens):
                async for _ in tokens:
                    pass

        try:
            await _until_disconnected(request, drain)
        except ClientGone:
            log.info("%s: the HTTP client went away; generation stopped", header.id)
            raise
        except Exception as err:
            raise _generation_error(err) from err
        self._log_done(header, report)
        answer = fmt.completion(header, report.text or "", report.finish_reason, _usage(report))
        return JSONResponse({**answer, "hearth": _route_json(report)})

    async def _events(self, header: ResponseHeader, parsed: CompletionRequest, first: Emitted,
                      tokens: AsyncIterator[Emitted], report: GenerationReport) -> AsyncIterator[bytes]:
        """Server-sent events of one streamed answer: chunks, the finish reason, usage, `[DONE]`."""
        completed = False
        try:
            async with aclosing(tokens):
                if parsed.chat:
                    yield fmt.sse(fmt.chunk(header, "", role=True, include_usage=parsed.include_usage))
                emitted: Emitted | None = first
                while emitted is not None:
                    if emitted.text:
                        yield fmt.sse(fmt.chunk(header, emitted.text, include_usage=parsed.include_usage))
                    try:
                        emitted = await tokens.__anext__()
                    except StopAsyncIteration:
                        emitted = None
                    except Exception as err:  # mid-answer: the status line is long sent
                        log.warning("%s failed mid-answer: %s", header.id, err)
                        completed = True
                        error = _generation_error(err)
                        self._count_error(error)
                        yield fmt.sse(error.body())
                        return
            completed = True
            self._log_done(header, report)
            last = fmt.chunk(header, None, finish_reason=report.finish_reason, include_usage=parsed.include_usage)
            yield fmt.sse({**last, "hearth": _route_json(report)})
            if parsed.include_usage:
                yield fmt.sse(fmt.usage_chunk(header, _usage(report)))
            yield fmt.sse("[DONE]")
        finally:
            if not completed:
                log.info("%s: the HTTP client went away mid-stream; generation stopped", header.id)

    # --- error answers ----------------------------------------------------------------------------

    def _count_error(self, error: ApiError) -> None:
        self.metrics.errors.labels(error.type, error.code or "none").inc()

    async def _api_error(self, request: Request, error: ApiError) -> Response:
        log.info("%s %s: %d %s", request.method, request.url.path, error.status, error.code or error.type)
        self._count_error(error)
        return _error_response(error)

    async def _http_error(self, request: Request, error: HTTPException) -> Response:
        message = f"Invalid URL ({request.method} {request.url.path})" if error.status_code in (404, 405) \
            else str(error.detail)
        api_error = ApiError(error.status_code, message)
        self._count_error(api_error)
        return _error_response(api_error, dict(error.headers or {}))

    async def _internal_error(self, request: Request, error: Exception) -> Response:
        log.error("internal error answering %s %s", request.method, request.url.path, exc_info=error)
        return await self._api_error(request, ApiError(500, "The server had an error while processing your request.",
                                                       type="server_error"))

    def _log_done(self, header: ResponseHeader, report: GenerationReport) -> None:
        log.info("%s: %d tokens (%s), %.1f tokens/s, route %s, %d recoveries%s%s%s", header.id,
                 len(report.token_ids), report.finish_reason, report.tokens_per_s, report.route_text(),
                 len(report.recoveries), f"; {report.verification.text()}" if report.verification.rate else "",
                 f"; {report.speculation.summary()}" if report.speculation.enabled else "",
                 f"; {report.reused_tokens} prompt tokens reused" if report.reused_tokens else "")


class EventStreamResponse(StreamingResponse):
    """Server-sent events that always end with their generator closed and `on_close` awaited.

    A disconnect cancels Starlette's sender, possibly while the generator waits at a `yield`, or
    before it started: without this, the generation (and its hops) would stay open. A client that
    stays connected but stops reading is dropped after SEND_TIMEOUT_S.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], *, on_close: Callable[[], Awaitable[None]]):
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def stream_response(self, send) -> None:
        async def bounded_send(message) -> None:
            with trio.fail_after(SEND_TIMEOUT_S):
                await send(message)

        try:
            async with aclosing(self.body_iterator):
                await super().stream_response(bounded_send)
        except trio.TooSlowError:
            log.warning("an HTTP client read nothing of its stream for %g s; dropped", SEND_TIMEOUT_S)
        finally:
            with trio.CancelScope(shield=True):
                await self.on_close()


class BearerAuth:
    """ASGI middleware: every HTTP request needs `Authorization: Bearer <api_key>`."""

    def __init__(self, app, api_key: str, public: frozenset[str] = frozenset(),
                 on_error: Callable[[ApiError], None] = lambda error: None):
        self.app, self.expected, self.public, self.on_error = app, f"Bearer {api_key}".encode(), public, on_error

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not (scope["method"] == "GET" and scope["path"] in self.public):
            given = dict(scope.get("headers", [])).get(b"authorization")
            if given is None or not hmac.compare_digest(given.strip(), self.expected):
                message = ("You didn't provide an API key. Send it as 'Authorization: Bearer KEY'."
                           if given is None else "Incorrect API key provided.")
                error = ApiError(401, message, code="invalid_api_key")
                self.on_error(error)
                await _error_response(error, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


ROUTE_LABELS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/api/swarm", "/metrics", "/", "/swarm")


def route_label(path: str) -> str:
    """A bounded label for a request path (metrics must not grow with what clients send)."""
    if path in ROUTE_LABELS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "/static" if path.startswith("/static/") else "other"


class RequestCounter:
    """ASGI middleware: counts every HTTP answer by route and status (errors of the guards too)."""

    def __init__(self, app, metrics: ApiMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [499]  # a client gone before any answer

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            self.metrics.requests.labels(route_label(scope["path"]), str(status[0])).inc()


async def read_json(request: Request) -> object:
    """The request body as JSON, at most MAX_BODY_BYTES, received within BODY_TIMEOUT_S."""
    chunks, size = [], 0
    with trio.move_on_after(BODY_TIMEOUT_S) as scope:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ApiError(413, f"The request body is over {MAX_BODY_BYTES} bytes.", code="body_too_large")
            chunks.append(chunk)
    if scope.cancelled_caught:
        raise ApiError(408, f"The request body did not arrive within {BODY_TIMEOUT_S:g} s.", code="timeout")
    try:
        return json.loads(b"".join(chunks))
    except RecursionError as err:
        raise ApiError(400, "We could not parse the JSON body of your request: it nests too deeply.",
                       code="invalid_json") from err
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"We could not parse the JSON body of your request: {err}. The body must be JSON.",
                       code="invalid_json") from err


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready; nobody is left to answer."""


async def _first_token(request: Request, tokens: AsyncIterator[Emitted]) -> Emitted:
    """The first token (the prefill), before any byte of a stream: its errors become HTTP errors."""
    try:
        return await _until_disconnected(request, tokens.__anext__)
    except BaseException as err:
        with trio.CancelScope(shield=True):
            await tokens.aclose()  # a generator that raised is closed already; one cancelled may not be
        if isinstance(err, Exception) and not isinstance(err, ClientGone):
            raise _generation_error(err) from err
        raise


_NOTHING = object()


async def _until_disconnected(request: Request, work: Callable[[], Awaitable[T]]) -> T:
    """`await work()`, cancelled if the HTTP client disconnects first (then raises ClientGone)."""
    result, error = _NOTHING, None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_disconnect, request, nursery.cancel_scope)
        try:
            result = await work()
        except Exception as err:  # re-raised outside the nursery, which would wrap it in a group
            error = err
        nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    if result is _NOTHING:
        raise ClientGone()
    return result


async def _cancel_on_disconnect(request: Request, scope: trio.CancelScope) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def _generation_error(err: Exception) -> ApiError:
    if isinstance(err, ApiError):
        return err
    if isinstance(err, NoRouteError):
        return _unavailable(err)
    if isinstance(err, GenerationFailed):
        return ApiError(503, str(err), type="server_error", code="generation_failed")
    if isinstance(err, HopFailed):
        return ApiError(502, f"a node could not serve the request: {err}", type="server_error", code="node_failed")
    if isinstance(err, PromptTooLong):
        return fmt.invalid(None, str(err), "context_length_exceeded")
    if isinstance(err, ShardError):
        return fmt.invalid(None, str(err))
    log.error("internal error while generating", exc_info=err)
    return ApiError(500, "The server had an error while processing your request.", type="server_error")


def _unavailable(err: NoRouteError) -> ApiError:
    return ApiError(503, f"The swarm cannot run this model now: {err}", type="server_error", code="no_route",
                    extra={"missing_blocks": [list(gap) for gap in err.missing]})


def _usage(report: GenerationReport) -> dict:
    return fmt.usage(len(report.prompt_ids), len(report.token_ids))


def _error_response(error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers={**error.headers, **(headers or {})})


def _route_json(report: GenerationReport) -> dict:
    """The `hearth` object of an answer: the route it took, the failovers it survived, what spot
    checks found, its speed."""
    return {"route": report.route, "local_blocks": report.local_blocks,
            "recoveries": [r.to_json() for r in report.recoveries],
            "verification": report.verification.to_json(), "speculation": report.speculation.to_json(),
            "reused_tokens": report.reused_tokens,
            "tokens": len(report.token_ids), "tokens_per_s": round(report.tokens_per_s, 2)}


async def _client_gone(request: Request, error: Exception) -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


