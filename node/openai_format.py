"""The OpenAI API's vocabulary, without I/O: request bodies in, typed requests out; results in, JSON out.

Owns `ApiError` (an error in OpenAI's format, `{"error": {"message", "type", "param", "code"}}`,
with its HTTP status), the validation of `/v1/chat/completions` and `/v1/completions` bodies into a
`CompletionRequest`, the context-length check, and the JSON of responses, stream chunks and usage.

What is supported: `model`, `messages` / `prompt` (text, or token ids), `max_tokens`
(`max_completion_tokens` for chat), `temperature`, `top_p`, `stop`, `seed`, `n=1`, `stream` with
`stream_options.include_usage`, and the common extensions `top_k` and `repetition_penalty`.
Parameters that would change the answer in ways we do not implement (n > 1, logprobs, tools,
penalties, logit_bias, JSON mode, echo, best_of, suffix) are refused with a 400 naming them, when
set to anything but their neutral value; fields OpenAI does not define are refused as OpenAI
refuses them ("Unrecognized request argument").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from shard.errors import InvalidSamplingParams
from shard.sampling import SamplingParams

MAX_STOP_SEQUENCES = 4
MAX_TEMPERATURE = 2.0
ROLES = ("system", "developer", "user", "assistant", "tool")

# shard's finish reasons -> OpenAI's
FINISH_REASONS = {"stop_token": "stop", "stop_string": "stop", "length": "length"}


class ApiError(Exception):
    """An error answer: HTTP `status` and OpenAI's error object (plus any `extra` fields)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, extra: Mapping[str, object] | None = None,
                 headers: Mapping[str, str] | None = None):
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})  # HTTP headers of the answer (Retry-After, ...)
        super().__init__(message)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code,
                          **self.extra}}


def invalid(param: str | None, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class CompletionRequest:
    """One validated request of either endpoint; exactly one of messages, prompt, prompt_ids is set."""

    chat: bool
    model: str
    messages: tuple[dict, ...] | None = None
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False

    @property
    def prompt_param(self) -> str:
        return "messages" if self.chat else "prompt"

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        try:
            return SamplingParams(max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                  top_k=self.top_k, repetition_penalty=self.repetition_penalty, seed=self.seed,
                                  stop_strings=self.stop)
        except InvalidSamplingParams as err:
            param = {"max_new_tokens": "max_tokens", "stop_strings": "stop"}.get(err.field, err.field)
            raise invalid(param, f"Invalid value for '{param}': {err.reason} (got {err.value!r}).") from err


# --- parsing ------------------------------------------------------------------------------------

def _neutral(*values: object) -> Callable[[object], bool]:
    return lambda value: value is None or any(value == v and type(value) is type(v) for v in values)


# Parameters accepted only with their neutral value: what they would ask for is not implemented.
_COMMON_NEUTRAL = {
    "n": _neutral(1),
    "frequency_penalty": _neutral(0, 0.0),
    "presence_penalty": _neutral(0, 0.0),
    "logit_bias": _neutral({}),
}
_CHAT_NEUTRAL = {
    **_COMMON_NEUTRAL,
    "logprobs": _neutral(False),
    "top_logprobs": _neutral(0),
    "tools": _neutral([]),
    "tool_choice": _neutral("none", "auto"),
    "functions": _neutral([]),
    "function_call": _neutral("none"),
    "response_format": _neutral({"type": "text"}),
    "modalities": _neutral(["text"]),
}
_TEXT_NEUTRAL = {
    **_COMMON_NEUTRAL,
    "logprobs": _neutral(0),
    "echo": _neutral(False),
    "best_of": _neutral(1),
    "suffix": _neutral(""),
}
_IGNORED = {"user", "store", "metadata", "service_tier", "parallel_tool_calls"}  # no effect on the answer
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed",
           "stream", "stream_options"}
_CHAT_FIELDS = _COMMON | _IGNORED | set(_CHAT_NEUTRAL) | {"messages", "max_completion_tokens"}
_TEXT_FIELDS = _COMMON | _IGNORED | set(_TEXT_NEUTRAL) | {"prompt"}


def parse_chat_request(body: object, model: str) -> CompletionRequest:
    """A `/v1/chat/completions` body, checked against the served `model`; raises ApiError."""
    body = _object(body)
    _check_fields(body, _CHAT_FIELDS, _CHAT_NEUTRAL)
    _check_model(body, model)
    max_tokens = _optional_int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens", 1)
    return CompletionRequest(chat=True, model=model, messages=_messages(body.get("messages")),
                             max_tokens=max_tokens, **_sampling_fields(body))


def parse_completion_request(body: object, model: str) -> CompletionRequest:
    """A `/v1/completions` body, checked against the served `model`; raises ApiError."""
    body = _object(body)
    _check_fields(body, _TEXT_FIELDS, _TEXT_NEUTRAL)
    _check_model(body, model)
    prompt, prompt_ids = _prompt(body.get("prompt"))
    return CompletionRequest(chat=False, model=model, prompt=prompt, prompt_ids=prompt_ids,
                             max_tokens=_optional_int(body, "max_tokens", 1), **_sampling_fields(body))


def _object(body: object) -> dict:
    if not isinstance(body, dict):
        raise invalid(None, f"The request body must be a JSON object, not {type(body).__name__}.")
    return body


def _check_fields(body: dict, known: set[str], neutral: Mapping[str, Callable[[object], bool]]) -> None:
    for name in body:
        if name not in known:
            raise invalid(name, f"Unrecognized request argument supplied: {name}", "unrecognized_argument")
    for name, is_neutral in neutral.items():
        if not is_neutral(body.get(name)):
            raise invalid(name, f"'{name}' = {json.dumps(body[name])[:80]} is not supported by this server.",
                          "unsupported_parameter")


def _check_model(body: dict, model: str) -> None:
    requested = body.get("model")
    if not isinstance(requested, str) or not requested:
        raise invalid("model", "You must provide a model parameter.", "missing_model")
    if requested != model:
        raise ApiError(404, f"The model '{requested}' does not exist. This server serves '{model}'.",
                       param="model", code="model_not_found")


def _sampling_fields(body: dict) -> dict:
    stream = _optional_bool(body, "stream") or False
    options = body.get("stream_options")
    if options is not None and not stream:
        raise invalid("stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled.")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise invalid("stream_options", "'stream_options' must be an object with only 'include_usage'.")
    include_usage = bool(options and _optional_bool(options, "include_usage", "stream_options.include_usage"))
    temperature = _optional_number(body, "temperature")
    if temperature is not None and not 0 <= temperature <= MAX_TEMPERATURE:
        raise invalid("temperature", f"Invalid 'temperature': {temperature} is not between 0 and {MAX_TEMPERATURE:g}.")
    fields = {"temperature": temperature, "top_p": _optional_number(body, "top_p"),
              "top_k": _optional_int(body, "top_k", 0),
              "repetition_penalty": _optional_number(body, "repetition_penalty")}
    return {**{k: v for k, v in fields.items() if v is not None}, "seed": _optional_int(body, "seed", 0),
            "stop": _stop(body.get("stop")), "stream": stream, "include_usage": include_usage}


def _optional_int(body: Mapping, name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"Invalid type for '{name}': expected an integer, got {json.dumps(value)[:40]}.")
    if value < minimum:
        raise invalid(name, f"Invalid '{name}': {value} is less than the minimum of {minimum}.")
    return value


def _optional_number(body: Mapping, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(name, f"Invalid type for '{name}': expected a number, got {json.dumps(value)[:40]}.")
    return float(value)


def _optional_bool(body: Mapping, name: str, param: str | None = None) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid(param or name, f"Invalid type for '{param or name}': expected a boolean.")
    return value


def _stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop", "'stop' must be a non-empty string or a list of non-empty strings.")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid("stop", f"'stop' holds {len(stops)} sequences; at most {MAX_STOP_SEQUENCES} are allowed.")
    return tuple(stops)


def _messages(value: object) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise invalid("messages", "'messages' must be a non-empty list of messages.")
    return tuple(_message(message, f"messages[{index}]") for index, message in enumerate(value))


def _message(message: object, param: str) -> dict:
    """A message as chat templates expect it: role and text content (developer becomes system)."""
    if not isinstance(message, dict):
        raise invalid(param, f"'{param}' must be an object.")
    role = message.get("role")
    if role not in ROLES:
        raise invalid(f"{param}.role", f"Invalid '{param}.role': expected one of {', '.join(ROLES)}, got {role!r:.40}.")
    if message.get("tool_calls"):
        raise invalid(f"{param}.tool_calls", "Tool calls are not supported by this server.", "unsupported_parameter")
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(_text_part(part, f"{param}.content[{i}]") for i, part in enumerate(content))
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise invalid(f"{param}.content", f"'{param}.content' must be a string or a list of text parts.")
    result = {"role": "system" if role == "developer" else role, "content": content}
    if isinstance(message.get("name"), str):
        result["name"] = message["name"]
    return result


def _text_part(part: object, param: str) -> str:
    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        raise invalid(param, f"Only text content parts are supported, got {kind!r:.40}.", "unsupported_content")
    return part["text"]


def _prompt(value: object) -> tuple[str | None, tuple[int, ...] | None]:
    """A prompt: a string, a list of token ids, or a one-element list of either."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        return value, None
    if isinstance(value, list) and value and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                 for i in value):
        return None, tuple(value)
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise invalid("prompt", "Only one prompt per request is supported.", "unsupported_parameter")
    raise invalid("prompt", "'prompt' must be a string or a non-empty list of token ids.")


def max_new_tokens(request: CompletionRequest, prompt_tokens: int, context: int, default: int) -> int:
    """Tokens to generate: `max_tokens` if the context holds it, else an error; without it, up to `default`."""
    room = context - prompt_tokens
    if room < 1 or (request.max_tokens is not None and request.max_tokens > room):
        asked = prompt_tokens + (request.max_tokens or 0)
        detail = f"{prompt_tokens} in the {request.prompt_param}"
        if request.max_tokens is not None:
            detail += f", {request.max_tokens} in the completion"
        raise invalid(request.prompt_param,
                      f"This model's maximum context length is {context} tokens. However, you requested "
                      f"{asked} tokens ({detail}). Please reduce the length of the {request.prompt_param} "
                      f"or completion.", "context_length_exceeded")
    return request.max_tokens if request.max_tokens is not None else min(default, room)


# --- responses ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResponseHeader:
    """What every response and chunk of one request repeats."""

    id: str
    created: int
    model: str
    chat: bool

    def base(self, chunk: bool = False) -> dict:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(header: ResponseHeader, text: str, finish_reason: str, usage_json: dict) -> dict:
    """The whole answer of a request without `stream`."""
    finish = FINISH_REASONS.get(finish_reason, finish_reason)
    if header.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {**header.base(), "choices": [choice], "usage": usage_json}


def chunk(header: ResponseHeader, text: str | None, *, finish_reason: str | None = None, role: bool = False,
          include_usage: bool = False) -> dict:
    """One streamed chunk: a text delta (chat: and the role, first), or the finish reason, last."""
    finish = FINISH_REASONS.get(finish_reason, finish_reason) if finish_reason is not None else None
    if header.chat:
        delta = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    data = {**header.base(chunk=True), "choices": [choice]}
    if include_usage:
        data["usage"] = None
    return data


def usage_chunk(header: ResponseHeader, usage_json: dict) -> dict:
    """The last chunk when `stream_options.include_usage` is set: no choices, the usage."""
    return {**header.base(chunk=True), "choices": [], "usage": usage_json}


def model_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(model, created)]}


def model_card(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "hearth"}


def sse(data: dict | str) -> bytes:
    """One server-sent event carrying `data` (a JSON object, or the literal `[DONE]`)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
