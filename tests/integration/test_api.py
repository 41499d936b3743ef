"""Issue 7 end to end: the OpenAI-compatible API, driven by the official `openai` package.

One swarm of real node processes serves the module: node0 serves blocks 0:3 and the API (with a
key, logging each request: -v), node1..node3 serve 3:6, 0:3 and 3:6, so every block is served
twice; each serves /metrics on a port of its own too. A lone node serving 0:3 with an API of its
own (and JSON logs) is a swarm that cannot answer (503). Both live in a trio run in a
thread of their own (`TrioThread`), started once for the module. The failover and disconnect tests
run the same API in this process (`ApiServer` over a `mesh.Client`, the `hearth api` code) so
they can act at an exact step of a hop, as tests/integration/test_failover.py does.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import time
import urllib.error
import urllib.request
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import openai
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from mesh.client import ClientOptions
from mesh.join import connect
from mesh.session import HopSession
from node.api import ApiServer, ApiSettings
from node.swarm import LocalSwarm, NodeProcess
from protocol import Codec
from shard.tokenizer import Tokenizer
from tests.integration.conftest import NODE_ARGS, TrioThread

KEY = "sk-hearth-test"
MESSAGES = [{"role": "user", "content": "Hello world"}]
API_PREFIX = "api listening on "
METRICS_PREFIX = "metrics listening on "
METRICS = ["--metrics-port", "0"]


@dataclass
class ApiSwarm:
    swarm: LocalSwarm  # its nodes belong to `shared`'s trio run: signal them and wait for them there
    url: str  # node0's API, which needs KEY
    lone_url: str  # the API of a node alone with blocks 0:3, without a key
    metrics: dict[str, str]  # peer id -> its node's /metrics URL
    lone: NodeProcess
    model: str
    shared: TrioThread


async def api_url(node: NodeProcess) -> str:
    return (await node.wait_for(API_PREFIX, 10))[len(API_PREFIX):].strip()


async def metrics_url(node: NodeProcess) -> str:
    return (await node.wait_for(METRICS_PREFIX, 10))[len(METRICS_PREFIX):].strip()


async def serve_api_swarm(model_dir, work_dir, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Starts the module's nodes, reports (swarm, url, lone_url, metrics, lone), and keeps them until cancelled."""
    swarm = LocalSwarm(model_dir, extra_args=NODE_ARGS, work_dir=work_dir)
    lone = LocalSwarm(model_dir, extra_args=NODE_ARGS)
    try:
        async with swarm, lone:
            head = await swarm.add(0, 3, extra_args=["--api-port", "0", "--api-key", KEY, "-v", *METRICS])
            lone_node = await lone.add(0, 3, extra_args=["--api-port", "0", "--log-format", "json", "-v"])
            await head.wait_ready(120)
            for start, end in [(3, 6), (0, 3), (3, 6)]:
                await swarm.add(start, end, extra_args=METRICS)
            for node in swarm.nodes + lone.nodes:
                await node.wait_ready(120)
            metrics = {node.peer_id: await metrics_url(node) for node in swarm.nodes}
            task_status.started((swarm, await api_url(head), await api_url(lone_node), metrics, lone_node))
            await trio.sleep_forever()
    finally:
        assert not any(node.running for node in swarm.nodes + lone.nodes)


@pytest.fixture(scope="module")
def api_swarm(chat_model_dir, tmp_path_factory):
    """The module's swarm, shared by its tests: pytest-trio gives no module-scoped async fixture."""
    shared = TrioThread(partial(serve_api_swarm, chat_model_dir, tmp_path_factory.mktemp("api-swarm")), timeout=300)
    try:
        yield ApiSwarm(*shared.value, chat_model_dir.name, shared)
    finally:
        shared.close()


def openai_client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)


def post_raw(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.load(err)


def test_models_lists_the_model_directory(api_swarm):
    client = openai_client(api_swarm.url)
    assert [model.id for model in client.models.list()] == [api_swarm.model]
    assert client.models.retrieve(api_swarm.model).owned_by == "hearth"


def test_streamed_chat_deltas_add_up_to_the_plain_answer(api_swarm, chat_model_dir):
    client = openai_client(api_swarm.url)
    args = dict(model=api_swarm.model, messages=MESSAGES, max_tokens=24, temperature=0)
    answer = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))

    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text and answer.choices[0].message.content == text
    assert answer.choices[0].message.role == chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == answer.choices[0].finish_reason
    assert answer.id.startswith("chatcmpl-") and answer.model == api_swarm.model
    tokenizer = Tokenizer.from_dir(chat_model_dir)  # the chat template is the model's own
    prompt = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES), add_special_tokens=False)
    assert answer.usage.prompt_tokens == chunks[-1].usage.prompt_tokens == len(prompt)
    assert answer.usage.completion_tokens == chunks[-1].usage.completion_tokens
    assert chunks[-1].choices == []


def test_completion_stops_at_a_stop_string(api_swarm):
    client = openai_client(api_swarm.url)
    args = dict(model=api_swarm.model, prompt="Hello world", max_tokens=24, temperature=0)
    full = client.completions.create(**args).choices[0]
    text = full.text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert len(stop) == 2 and full.finish_reason == "length"

    cut = client.completions.create(**args, stop=[stop, "never in the text"]).choices[0]
    assert cut.text == text[:text.index(stop)] and cut.finish_reason == "stop"
    streamed = list(client.completions.create(**args, stop=stop, stream=True))
    assert "".join(chunk.choices[0].text for chunk in streamed) == cut.text
    assert streamed[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("change, status, param, code", [
    (dict(model="no-such-model"), 404, "model", "model_not_found"),
    (dict(n=2), 400, "n", "unsupported_parameter"),
    (dict(logprobs=True), 400, "logprobs", "unsupported_parameter"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), 400, "tools",
     "unsupported_parameter"),
    (dict(extra_body={"mirostat": 2}), 400, "mirostat", "unrecognized_argument"),
    (dict(temperature=3.5), 400, "temperature", None),
    (dict(max_tokens=500), 400, "messages", "context_length_exceeded"),
    (dict(messages=[{"role": "user", "content": "the lazy dog " * 60}]), 400, "messages", "context_length_exceeded"),
], ids=["unknown-model", "n", "logprobs", "tools", "unknown-field", "temperature", "max-tokens", "long-prompt"])
def test_bad_requests_get_openai_errors(api_swarm, change, status, param, code):
    args = {"model": api_swarm.model, "messages": MESSAGES, "max_tokens": 4, **change}
    with pytest.raises(openai.APIStatusError) as err:
        openai_client(api_swarm.url).chat.completions.create(**args)
    assert (err.value.status_code, err.value.param, err.value.code) == (status, param, code)
    assert err.value.type == "invalid_request_error" and err.value.message


def test_bad_json_gets_an_openai_error(api_swarm):
    status, body = post_raw(f"{api_swarm.url}/chat/completions", b'{"model": "tiny-chat", "messages": [',
                            {"Authorization": f"Bearer {KEY}"})
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "invalid_json"


def test_no_route_is_503_naming_the_missing_blocks(api_swarm):
    client = openai_client(api_swarm.lone_url, key="unused")
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model=api_swarm.model, messages=MESSAGES, max_tokens=4)
    assert err.value.status_code == 503 and err.value.code == "no_route"
    assert "[3, 6)" in err.value.message and err.value.body["missing_blocks"] == [[3, 6]]


def test_the_key_is_required_when_set(api_swarm):
    body = json.dumps({"model": api_swarm.model, "messages": MESSAGES}).encode()
    status, answer = post_raw(f"{api_swarm.url}/chat/completions", body, {})
    assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai_client(api_swarm.url, key="sk-wrong").models.list()
    assert openai_client(api_swarm.lone_url, key="anything").models.list().data  # no key set: none needed


@asynccontextmanager
async def api_in_process(swarm: LocalSwarm):
    """`hearth api` in this process: an ApiServer over a client joined through node0."""
    options = ClientOptions(codec=Codec.FP32)
    async with connect(bootstrap=[swarm.nodes[0].addr], model=swarm.model_dir, options=options) as client:
        api = ApiServer(client, ApiSettings(port=0), wall_clock=time.time)
        async with trio.open_nursery() as nursery:
            url = await nursery.start(api.run)
            yield api, openai_client(url, key="unused")
            api.stop()


async def free_cache_tokens(api: ApiServer) -> dict[str, int]:
    """Each live node's free KV-cache positions, from its info stream (fewer while sessions are open)."""
    return {record.peer_id: info.free_cache_tokens for record, info in await api.client.servers()}


@pytest.mark.parametrize("stream, stuck_at", [(True, 6), (False, 6), (True, 0)],
                         ids=["stream", "plain", "stream-in-prefill"])
async def test_a_client_leaving_mid_answer_frees_the_sessions_on_every_hop(api_swarm, monkeypatch, stream, stuck_at):
    async with api_in_process(api_swarm.swarm) as (api, client):
        idle = await free_cache_tokens(api)
        original, stuck, checked = HopSession.step, trio.Event(), trio.Event()

        async def step(self, hidden, position, **kwargs):
            if self.step_number == stuck_at and self.start == 0 and not kwargs.get("replay"):
                stuck.set()  # both hops hold a session now
                await trio.sleep_forever()
            return await original(self, hidden, position, **kwargs)

        monkeypatch.setattr(HopSession, "step", step)
        args = dict(model=api_swarm.model, messages=MESSAGES, max_tokens=40, temperature=0, stream=stream)

        def request_and_leave():
            if stuck_at > 0 and stream:  # read the first chunk, then leave mid-answer
                chunks = client.chat.completions.create(**args)
                next(iter(chunks))
                trio.from_thread.run(checked.wait)
                chunks.close()
            else:  # no answer (nor, streaming, its first token) comes: the client gives up waiting
                with pytest.raises(openai.APITimeoutError):
                    client.with_options(timeout=3.0).chat.completions.create(**args)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, request_and_leave)
            try:
                with trio.fail_after(10):
                    await stuck.wait()
                busy = await free_cache_tokens(api)
                assert sum(busy[peer] < idle[peer] for peer in idle) == 2 and api.active == 1  # a session per hop
            finally:
                checked.set()
        with trio.fail_after(10):
            while True:
                now = await free_cache_tokens(api)
                if api.active == 0 and all(now[peer] >= idle[peer] for peer in idle):
                    break
                await trio.sleep(0.05)


async def test_a_streamed_answer_survives_sigkill_of_a_route_node(api_swarm, monkeypatch):
    swarm = api_swarm.swarm
    async with api_in_process(swarm) as (api, client):
        args = dict(model=api_swarm.model, messages=MESSAGES, max_tokens=32, temperature=0)
        answer = await trio.to_thread.run_sync(lambda: client.chat.completions.create(**args))
        original, killed = HopSession.step, []

        async def step(self, hidden, position, **kwargs):
            if self.step_number == 8 and self.end == 6 and not killed:  # the tail hop, mid-answer
                victim = next(node for node in swarm.nodes if node.peer_id == self.peer_id)
                await api_swarm.shared.run_sync(victim.signal, signal.SIGKILL)
                killed.append(victim)
            return await original(self, hidden, position, **kwargs)

        monkeypatch.setattr(HopSession, "step", step)

        def stream_text():
            chunks = list(client.chat.completions.create(**args, stream=True))
            return "".join(chunk.choices[0].delta.content or "" for chunk in chunks), chunks[-1].model_extra["hearth"]

        text, hearth = await trio.to_thread.run_sync(stream_text)
    assert answer.usage.completion_tokens > 8 and killed  # the kill happened mid-answer
    assert text == answer.choices[0].message.content
    (recovery,) = hearth["recoveries"]  # the last chunk says what the answer survived...
    assert recovery["failed_peer"] == killed[0].peer_id and recovery["blocks"] == [3, 6]
    assert killed[0].peer_id not in {hop["peer_id"] for hop in hearth["route"]}
    assert [event["kind"] for event in api.watch.events] == ["failover"]  # ...and so does the swarm page
    assert await api_swarm.shared.run(killed[0].wait, 5) == -signal.SIGKILL


def get_raw(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics page, parsed by prometheus_client: (name, sorted labels) -> value."""
    status, _, body = get_raw(url, headers)
    assert status == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


def live_metrics(api_swarm: ApiSwarm) -> dict[str, str]:
    """Peer id -> /metrics URL of the module's nodes still running (a test before may have killed one)."""
    return {node.peer_id: api_swarm.metrics[node.peer_id] for node in api_swarm.swarm.nodes if node.running}


def moved(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def total(samples: dict, name: str) -> float:
    return sum(value for (sample, _), value in samples.items() if sample == name)


def test_metrics_count_a_generation_on_the_api_and_on_every_hop(api_swarm):
    auth = {"Authorization": f"Bearer {KEY}"}
    api_metrics = api_swarm.url.removesuffix("/v1") + "/metrics"
    nodes = live_metrics(api_swarm)
    nodes_before = {peer: scrape(url) for peer, url in nodes.items()}
    api_before = scrape(api_metrics, auth)

    body = json.dumps({"model": api_swarm.model, "messages": MESSAGES, "max_tokens": 12, "temperature": 0}).encode()
    status, answer = post_raw(f"{api_swarm.url}/chat/completions", body, auth)
    assert status == 200
    prompt, completion = answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]
    route = answer["hearth"]["route"]
    assert answer["hearth"]["local_blocks"] == 1  # the API's client runs block 0 itself (auto)
    assert [(hop["start"], hop["end"]) for hop in route] == [(1, 3), (3, 6)] and answer["hearth"]["recoveries"] == []
    assert answer["hearth"]["tokens"] == completion > 1

    api_after = scrape(api_metrics, auth)
    assert moved(api_before, api_after, "hearth_api_requests_total", route="/v1/chat/completions", status="200") == 1
    assert moved(api_before, api_after, "hearth_api_prompt_tokens_total") == prompt
    assert moved(api_before, api_after, "hearth_api_completion_tokens_total") == completion
    assert moved(api_before, api_after, "hearth_api_time_to_first_token_seconds_count") == 1
    assert moved(api_before, api_after, "hearth_api_inter_token_seconds_count") == completion - 1
    assert moved(api_before, api_after, "hearth_api_generations_total", outcome=answer["choices"][0]["finish_reason"]) == 1
    assert api_after[("hearth_api_generations_active", ())] == 0
    assert moved(api_before, api_after, "hearth_dht_lookup_seconds_count", result="ok") >= 1  # the client planned

    on_route = {hop["peer_id"] for hop in route}
    for peer, url in nodes.items():
        before, after = nodes_before[peer], scrape(url)
        hops = 1 if peer in on_route else 0
        assert moved(before, after, "hearth_sessions_opened_total") == hops, peer
        # the API speculates: each decode pass is a token alone or with its drafts
        drafts = answer["hearth"]["speculation"]
        assert moved(before, after, "hearth_steps_total", kind="prefill") == hops
        assert (moved(before, after, "hearth_steps_total", kind="decode")
                + moved(before, after, "hearth_steps_total", kind="speculative")) == hops * drafts["passes"]
        assert moved(before, after, "hearth_step_tokens_total") == hops * (prompt + drafts["passes"] + drafts["drafted"])
        assert moved(before, after, "hearth_step_compute_seconds_count") == hops * (1 + drafts["passes"])
        assert total(after, "hearth_activation_bytes_total") - total(before, "hearth_activation_bytes_total") > 0 or not hops
        assert after[("hearth_sessions_open", ())] == 0 and after[("hearth_kv_cache_reserved_bytes", ())] == 0
        assert after[("hearth_kv_cache_budget_bytes", ())] > 0


def test_errors_are_counted_by_type(api_swarm):
    auth = {"Authorization": f"Bearer {KEY}"}
    api_metrics = api_swarm.url.removesuffix("/v1") + "/metrics"
    before = scrape(api_metrics, auth)
    post_raw(f"{api_swarm.url}/chat/completions", b"{", auth)
    post_raw(f"{api_swarm.url}/chat/completions", b"{}", {})
    after = scrape(api_metrics, auth)
    assert moved(before, after, "hearth_api_errors_total", type="invalid_request_error", code="invalid_json") == 1
    assert moved(before, after, "hearth_api_errors_total", type="invalid_request_error", code="invalid_api_key") == 1
    assert moved(before, after, "hearth_api_requests_total", route="/v1/chat/completions", status="401") == 1


@pytest.mark.parametrize("headers, status, code", [
    ({"Host": "attacker.example"}, 403, "host_not_allowed"),  # DNS rebinding: a name that resolves here
    ({"Origin": "http://attacker.example"}, 403, "origin_not_allowed"),
    ({"Sec-Fetch-Site": "cross-site"}, 403, "origin_not_allowed"),
    ({"Content-Type": "text/plain"}, 415, "unsupported_media_type"),  # what a page may POST without preflight
], ids=["host", "origin", "sec-fetch-site", "text-plain"])
def test_web_pages_of_other_origins_cannot_drive_the_api(api_swarm, headers, status, code):
    body = json.dumps({"model": api_swarm.model, "messages": MESSAGES, "max_tokens": 2}).encode()
    answer_status, answer = post_raw(f"{api_swarm.lone_url}/chat/completions", body, headers)  # no key needed there
    assert (answer_status, answer["error"]["code"]) == (status, code)


def test_the_pages_are_public_but_their_data_needs_the_key(api_swarm):
    base = api_swarm.url.removesuffix("/v1")
    for path in ("/", "/swarm", "/static/chat.js", "/static/swarm.js", "/static/hearth.css"):
        status, headers, body = get_raw(base + path, {"Sec-Fetch-Site": "cross-site"})  # a link from elsewhere
        assert status == 200 and body, path
        assert "default-src 'self'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
    assert get_raw(base + "/api/swarm")[0] == 401
    assert get_raw(base + "/metrics")[0] == 401
    status, _, body = get_raw(base + "/api/swarm", {"Authorization": f"Bearer {KEY}"})
    view = json.loads(body)
    live = [node for node in api_swarm.swarm.nodes if node.running]
    coverage = [sum(int(node.args[node.args.index("--blocks") + 1].split(":")[0]) <= block
                    < int(node.args[node.args.index("--blocks") + 1].split(":")[1]) for node in live) for block in range(6)]
    assert status == 200 and view["model"]["blocks"] == 6 and view["gaps"] == [] and view["coverage"] == coverage
    online = [peer for peer in view["peers"] if peer["online"]]
    assert {peer["peer_id"] for peer in online} == {node.peer_id for node in live}
    assert sum(peer["self"] for peer in online) == 1 and all(peer["rtt_ms"] > 0 for peer in online)


def test_json_logs_are_one_object_per_line_and_no_log_holds_text(api_swarm):
    secret = "marmalade"
    client = openai_client(api_swarm.url)
    answer = client.chat.completions.create(model=api_swarm.model, max_tokens=8, temperature=0,
                                            messages=[{"role": "user", "content": f"My secret is {secret}"}])
    head = api_swarm.swarm.nodes[0]
    assert any(answer.id in line for line in head.lines)  # -v: the request was logged...
    assert not any(secret in line or answer.choices[0].message.content in line for line in head.lines)  # ...not its text

    with pytest.raises(openai.InternalServerError):  # the lone node logs a request and its failure
        openai_client(api_swarm.lone_url, key="unused").chat.completions.create(
            model=api_swarm.model, messages=[{"role": "user", "content": secret}], max_tokens=2)
    events = [json.loads(line) for line in api_swarm.lone.lines if line.strip()]
    assert {"time", "level", "logger", "message"} <= set(events[0])
    messages = [event["message"] for event in events]
    assert any(m.startswith("listening on ") for m in messages) and any("prompt tokens" in m for m in messages)
    assert not any(secret in m for m in messages)


def test_malformed_and_oversized_bodies_get_400_not_a_traceback(api_swarm):
    url = f"{api_swarm.lone_url}/chat/completions"
    status, body = post_raw(url, b"[" * 100_000 + b"]" * 100_000, {})  # deeper than any parser's stack
    assert (status, body["error"]["code"]) == (400, "invalid_json")
    huge = json.dumps({"model": api_swarm.model, "messages": [{"role": "user", "content": "x" * (3 << 20)}]}).encode()
    status, body = post_raw(url, huge, {})  # refused by its length, before any tokenizing
    assert (status, body["error"]["code"], body["error"]["param"]) == (400, "context_length_exceeded", "messages")
    assert "characters" in body["error"]["message"]


async def test_generations_beyond_the_cap_get_429_with_retry_after(api_swarm, monkeypatch):
    options = ClientOptions(codec=Codec.FP32)
    original, stuck = HopSession.step, trio.Event()

    async def step(self, hidden, position, **kwargs):
        if self.step_number == 2:
            stuck.set()
            await trio.sleep_forever()  # hold the one generation the API may run
        return await original(self, hidden, position, **kwargs)

    monkeypatch.setattr(HopSession, "step", step)
    async with connect(bootstrap=[api_swarm.swarm.nodes[0].addr], model=api_swarm.swarm.model_dir,
                       options=options) as client:
        api = ApiServer(client, ApiSettings(port=0, max_concurrent=1), wall_clock=time.time)
        async with trio.open_nursery() as nursery:
            url = await nursery.start(api.run)
            body = json.dumps({"model": api_swarm.model, "messages": MESSAGES, "max_tokens": 8, "stream": True}).encode()

            def held():  # its stream starts, then stalls until the server stops (or the reader's 10 s)
                request = urllib.request.Request(f"{url}/chat/completions", data=body,
                                                 headers={"Content-Type": "application/json"})
                with contextlib.suppress(OSError, http.client.HTTPException):
                    with urllib.request.urlopen(request, timeout=10) as response:
                        response.read()

            nursery.start_soon(trio.to_thread.run_sync, held)
            with trio.fail_after(10):
                await stuck.wait()
            request = urllib.request.Request(f"{url}/chat/completions", data=body,
                                             headers={"Content-Type": "application/json"})

            def refused() -> tuple[int, str, dict]:  # read in the thread: a blocking read here would stall
                try:                                 # the server that has yet to send the body
                    urllib.request.urlopen(request, timeout=10).close()
                except urllib.error.HTTPError as err:
                    with err:
                        return err.code, err.headers["Retry-After"], json.load(err)
                raise AssertionError("a generation beyond the cap was admitted")

            code, retry_after, answer = await trio.to_thread.run_sync(refused)
            assert (code, retry_after, answer["error"]["code"]) == (429, "1", "rate_limit_exceeded")
            api.stop()
