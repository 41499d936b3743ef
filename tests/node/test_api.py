"""The OpenAI-compatible API without a swarm: request parsing, response shapes, settings, the CLI.

The API against real node processes, with the `openai` package, is tests/integration/test_api.py.
"""

from __future__ import annotations

import json

import pytest

from node import openai_format as fmt
from node.api import ApiSettings, is_loopback
from node.cli import main
from node.openai_format import ApiError, ResponseHeader
from shard.errors import InvalidInput

MODEL = "tiny-chat"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def error_of(call, *args) -> ApiError:
    with pytest.raises(ApiError) as err:
        call(*args)
    return err.value


def test_a_chat_request_becomes_sampling_params():
    request = fmt.parse_chat_request({**CHAT, "max_tokens": 7, "temperature": 0, "top_p": 0.5, "seed": 3,
                                      "stop": "\n", "n": 1, "user": "someone", "stream": True,
                                      "stream_options": {"include_usage": True}}, MODEL)
    params = request.sampling(7)
    assert (params.max_new_tokens, params.temperature, params.top_p, params.seed) == (7, 0.0, 0.5, 3)
    assert params.stop_strings == ("\n",) and request.stream and request.include_usage
    assert fmt.parse_chat_request(CHAT, MODEL).temperature == 1.0  # OpenAI's default: sampling


def test_messages_are_normalized_for_chat_templates():
    request = fmt.parse_chat_request({"model": MODEL, "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": None, "name": "bot"}]}, MODEL)
    assert request.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
                                {"role": "assistant", "content": "", "name": "bot"})


@pytest.mark.parametrize("prompt, text, ids", [
    ("Hello", "Hello", None), (["Hello"], "Hello", None), ([5, 6, 7], None, (5, 6, 7)), ([[5, 6]], None, (5, 6)),
])
def test_completion_prompts_are_text_or_token_ids(prompt, text, ids):
    request = fmt.parse_completion_request({"model": MODEL, "prompt": prompt}, MODEL)
    assert (request.prompt, request.prompt_ids) == (text, ids)


@pytest.mark.parametrize("body, status, param, code", [
    ([1, 2], 400, None, None),
    ({"messages": CHAT["messages"]}, 400, "model", "missing_model"),
    ({**CHAT, "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ({**CHAT, "n": 3}, 400, "n", "unsupported_parameter"),
    ({**CHAT, "logprobs": True}, 400, "logprobs", "unsupported_parameter"),
    ({**CHAT, "presence_penalty": 0.5}, 400, "presence_penalty", "unsupported_parameter"),
    ({**CHAT, "response_format": {"type": "json_object"}}, 400, "response_format", "unsupported_parameter"),
    ({**CHAT, "frobnicate": 1}, 400, "frobnicate", "unrecognized_argument"),
    ({**CHAT, "max_tokens": 0}, 400, "max_tokens", None),
    ({**CHAT, "max_tokens": True}, 400, "max_tokens", None),
    ({**CHAT, "temperature": "hot"}, 400, "temperature", None),
    ({**CHAT, "seed": -1}, 400, "seed", None),
    ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ({**CHAT, "stop": [""]}, 400, "stop", None),
    ({**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ({**CHAT, "messages": []}, 400, "messages", None),
    ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", None),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "messages[0].content[0]", "unsupported_content"),
])
def test_bad_chat_requests_name_the_parameter(body, status, param, code):
    error = error_of(fmt.parse_chat_request, body, MODEL)
    assert (error.status, error.param, error.code) == (status, param, code)
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL}, "prompt"), ({"model": MODEL, "prompt": ["a", "b"]}, "prompt"),
    ({"model": MODEL, "prompt": [1, -2]}, "prompt"), ({"model": MODEL, "prompt": "x", "echo": True}, "echo"),
    ({"model": MODEL, "prompt": "x", "best_of": 2}, "best_of"),
])
def test_bad_completion_requests_name_the_parameter(body, param):
    assert error_of(fmt.parse_completion_request, body, MODEL).param == param


def test_top_p_out_of_range_is_reported_as_top_p():
    request = fmt.parse_chat_request({**CHAT, "top_p": 0}, MODEL)
    assert error_of(request.sampling, 4).param == "top_p"


def test_max_tokens_must_fit_the_context():
    request = fmt.parse_chat_request({**CHAT, "max_tokens": 100}, MODEL)
    assert fmt.max_new_tokens(request, 28, context=128, default=16) == 100
    error = error_of(fmt.max_new_tokens, request, 29, 128, 16)
    assert error.code == "context_length_exceeded" and "129 tokens (29 in the messages, 100 in the completion)" \
        in error.message
    unbounded = fmt.parse_chat_request(CHAT, MODEL)
    assert fmt.max_new_tokens(unbounded, 120, context=128, default=16) == 8  # what the context has room for
    assert fmt.max_new_tokens(unbounded, 20, context=128, default=16) == 16
    assert error_of(fmt.max_new_tokens, unbounded, 128, 128, 16).code == "context_length_exceeded"


def test_response_shapes_follow_openai():
    chat = ResponseHeader("chatcmpl-1", 1700000000, MODEL, chat=True)
    answer = fmt.completion(chat, "Hi!", "stop_token", fmt.usage(5, 2))
    assert answer["object"] == "chat.completion" and answer["usage"]["total_tokens"] == 7
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "Hi!"}
    assert answer["choices"][0]["finish_reason"] == "stop"
    first = fmt.chunk(chat, "", role=True)
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {"role": "assistant",
                                                                                           "content": ""}
    assert fmt.chunk(chat, None, finish_reason="length")["choices"][0] == {
        "index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    text = ResponseHeader("cmpl-1", 1700000000, MODEL, chat=False)
    assert fmt.completion(text, "x", "stop_string", fmt.usage(1, 1))["choices"][0]["finish_reason"] == "stop"
    assert fmt.chunk(text, "ab")["object"] == "text_completion"
    assert fmt.sse("[DONE]") == b"data: [DONE]\n\n"
    assert json.loads(fmt.sse({"a": "é"})[len(b"data: "):]) == {"a": "é"}


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("192.168.1.10", False), ("::", False), ("example.org", False),
])
def test_only_loopback_hosts_may_go_without_a_key(host, loopback):
    assert is_loopback(host) == loopback
    if loopback:
        ApiSettings(host=host, port=0)
    else:
        with pytest.raises(InvalidInput, match="without authentication"):
            ApiSettings(host=host, port=0)
        assert ApiSettings(host=host, port=0, api_key="k").bind.endswith(":0")


def test_the_commands_refuse_to_serve_beyond_loopback_without_a_key(checkpoint_factory, capsys):
    model = str(checkpoint_factory("llama"))
    assert main(["node", "--model", model, "--blocks", "0:3", "--api-port", "0", "--api-host", "0.0.0.0"]) == 2
    assert "without authentication" in capsys.readouterr().err
    assert main(["api", "--bootstrap", "/ip4/127.0.0.1/tcp/9/p2p/QmNone", "--model", model, "--port", "0",
                 "--host", "0.0.0.0"]) == 2
    assert "give an API key (--api-key)" in capsys.readouterr().err


def test_the_commands_need_a_tokenizer_for_the_api(checkpoint_factory, capsys):
    model = str(checkpoint_factory("llama"))  # a checkpoint without tokenizer.json
    assert main(["node", "--model", model, "--blocks", "0:3", "--api-port", "0"]) == 2
    assert "tokenizer.json" in capsys.readouterr().err
    assert main(["node", "--model", model, "--blocks", "0:3", "--api-key", "k"]) == 2
    assert "need --api-port" in capsys.readouterr().err
