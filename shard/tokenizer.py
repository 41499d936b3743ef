"""Text <-> token ids for a checkpoint directory, its chat templates, and streaming detokenization.

Owns `Tokenizer` (a `tokenizers.Tokenizer` from `tokenizer.json`, configured by
`tokenizer_config.json` and `generation_config.json` the way transformers configures its fast
tokenizer), chat-template rendering in a sandboxed jinja2 environment, and `IncrementalDecoder`,
which turns a stream of token ids into text deltas that never split a character.

Not reproduced from transformers: `clean_up_tokenization_spaces` (transformers itself skips it for
BPE models, which every supported family is), slow/sentencepiece tokenizers, and processors'
`chat_template.json`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as BackendTokenizer

from shard.errors import ChatTemplateError, TokenizerFileError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TEMPLATE_FILE = "chat_template.jinja"
EXTRA_TEMPLATES_DIR = "additional_chat_templates"

# The named special tokens transformers exposes to chat templates (as `bos_token`, ...).
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)
_MIN_JINJA = (3, 1, 6)  # older versions have known sandbox escapes; templates are untrusted code


class Tokenizer:
    """A model's tokenizer: `encode`, `decode`, special token ids and `apply_chat_template`."""

    def __init__(
        self,
        backend: BackendTokenizer,
        special_tokens: Mapping[str, str],
        eos_token_ids: Sequence[int] = (),
        chat_templates: Mapping[str, str] | None = None,
        source: str = "<memory>",
    ):
        self.backend = backend
        self.special_tokens = dict(special_tokens)  # name ("bos_token", ...) -> token text
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.bos_token_id = self._id_of(self.bos_token)
        self.eos_token_ids = _unique_ids([self._id_of(self.eos_token), *eos_token_ids])
        self.chat_templates = dict(chat_templates or {})
        self.source = source
        added = backend.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, token in added.items() if token.special)
        self.byte_fallback_ids = _byte_fallback_ids(backend)
        self._compiled: dict[str, jinja2.Template] = {}

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json`, `generation_config.json`, templates)."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise TokenizerFileError(str(model_dir), "is not a directory")
        backend = _load_backend(model_dir / TOKENIZER_FILE)
        config = _read_json(model_dir / CONFIG_FILE, required=False)
        special = _register_special_tokens(backend, config, model_dir / CONFIG_FILE)
        wants_bos_eos = config.get("add_bos_token") or config.get("add_eos_token")
        if backend.post_processor is None and wants_bos_eos:
            _set_bos_eos_processor(backend, config, special)
        generation = _read_json(model_dir / GENERATION_CONFIG_FILE, required=False)
        eos_ids = _generation_eos_ids(generation, model_dir / GENERATION_CONFIG_FILE)
        templates = _load_chat_templates(model_dir, config)
        return cls(backend, special, eos_ids, templates, source=str(model_dir))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        template_name: str | None = None,
        **variables: Any,
    ) -> str:
        """Render `messages` with the model's chat template, as transformers renders it.

        `template_name` picks one of several named templates (default: "tool_use" when `tools`
        is given and exists, else "default"). Extra `variables` (tools, documents,
        enable_thinking, ...) are passed to the template and override the special tokens.
        """
        name = self._template_name(template_name, tools=variables.get("tools"))
        template = self._compiled.get(name)
        if template is None:
            template = self._compiled[name] = compile_chat_template(self.chat_templates[name])
        context = {"tools": None, "documents": None, **self.special_tokens, **variables}
        context = _plain(context, "template variable")
        chat = _normalize_messages(messages)
        try:
            return template.render(messages=chat, add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as err:
            raise ChatTemplateError(f"chat template {name!r} of {self.source} failed: {err}") from err

    def _template_name(self, requested: str | None, tools: object) -> str:
        if not self.chat_templates:
            raise ChatTemplateError(
                f"{self.source} has no chat template (no 'chat_template' in {CONFIG_FILE}, "
                f"no {TEMPLATE_FILE}); pass a raw prompt instead"
            )
        names = sorted(self.chat_templates)
        if requested is not None:
            if requested not in self.chat_templates:
                raise ChatTemplateError(f"no chat template named {requested!r}; available: {names}")
            return requested
        if tools is not None and "tool_use" in self.chat_templates:
            return "tool_use"
        if "default" in self.chat_templates:
            return "default"
        raise ChatTemplateError(f"{self.source} has several chat templates and no 'default': {names}")

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)


class IncrementalDecoder:
    """Streaming detokenizer: push ids one at a time, get the text each one completes.

    Keeps a window of ids: `prefix` (ids whose text was already emitted, for context) and the ids
    after it. The window is decoded as a whole, so decoders that look at neighbours (leading-space
    stripping, byte fallback, byte-level BPE) see the same context they would in a full decode.
    Text is held back while it ends in U+FFFD (an incomplete UTF-8 sequence) and, for byte-fallback
    tokenizers, while the last id is a <0xNN> byte token: the ByteFallback decoder turns a whole
    run of byte tokens into U+FFFDs if the run is not valid UTF-8, so a later byte can change how
    earlier ones read. Concatenated deltas plus `flush()` equal `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # window start
        self._read_offset = 0  # ids before this have had their text emitted
        self._in_byte_run = False  # the last id that reaches the decoder is a <0xNN> token

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (often "", never a broken character)."""
        self.token_ids.append(token_id)
        if token_id in self.tokenizer.byte_fallback_ids:
            self._in_byte_run = True
            return ""
        skipped = self.skip_special_tokens and token_id in self.tokenizer.special_ids
        if skipped and self._in_byte_run:
            return ""  # invisible to the decoder: the byte run may continue after it
        self._in_byte_run = False
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset, len(self.token_ids))
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        return text[len(prefix_text) :]

    def extend(self, token_ids: Sequence[int]) -> str:
        return "".join(self.push(token_id) for token_id in token_ids)

    def flush(self) -> str:
        """At the end of a sequence: the text still held back (an incomplete character as U+FFFD)."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset, len(self.token_ids))
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        self._in_byte_run = False
        return text[len(prefix_text) :]

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self.tokenizer.decode(self.token_ids[start:end], self.skip_special_tokens)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandboxed environment transformers uses."""
    if _version_tuple(jinja2.__version__) < _MIN_JINJA:
        raise ChatTemplateError(
            f"jinja2 {jinja2.__version__} is too old to run chat templates safely; need >= 3.1.6"
        )
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"chat template does not compile: {err}") from err


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters; transformers' (and so every template) does not
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` inside templates, without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore attributes (a route to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'")


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (assistant-mask markers) and render the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts)


def _normalize_messages(messages: object) -> list[dict]:
    """Plain-JSON copies of the messages, with None-valued keys dropped (as transformers does)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ChatTemplateError(f"messages must be a non-empty list of dicts, got {messages!r:.80}")
    chat = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"each message must be a dict, got {message!r:.80}")
        chat.append({k: _plain(v, "message field") for k, v in message.items() if v is not None})
    return chat


def _plain(value: Any, what: str) -> Any:
    """Copy `value` as plain JSON types; anything else would give templates methods to call."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, what) for v in value]
    raise ChatTemplateError(f"{what} of type {type(value).__name__} is not plain JSON data")


def _read_json(path: Path, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise TokenizerFileError(str(path), "is missing")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerFileError(str(path), f"is not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise TokenizerFileError(str(path), f"must hold a JSON object, not {type(data).__name__}")
    return data


def _load_backend(path: Path) -> BackendTokenizer:
    if not path.is_file():
        raise TokenizerFileError(str(path), "is missing")
    try:
        backend = BackendTokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exception for any parse error
        raise TokenizerFileError(str(path), f"cannot be loaded ({err})") from err
    backend.no_truncation()  # a tokenizer.json may carry truncation/padding; encode must not
    backend.no_padding()
    return backend


def _added_token(value: object, key: str, path: Path) -> AddedToken | None:
    """A special token from tokenizer_config.json: a string, an AddedToken dict, or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        flags = ("single_word", "lstrip", "rstrip", "normalized")
        kwargs = {f: bool(value[f]) for f in flags if f in value}
        kwargs.setdefault("normalized", False)
        return AddedToken(value["content"], special=True, **kwargs)
    raise TokenizerFileError(
        str(path), f"{key} must be a string or an AddedToken object, got {value!r:.80}"
    )


def _register_special_tokens(backend: BackendTokenizer, config: dict, path: Path) -> dict[str, str]:
    """Named special tokens, each made a special added token of `backend` if it is not yet one."""
    named = {key: _added_token(config.get(key), key, path) for key in SPECIAL_TOKEN_NAMES}
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
    if isinstance(extra, Mapping):
        extra = list(extra.values())
    if not isinstance(extra, list):
        reason = f"additional_special_tokens must be a list, got {extra!r:.80}"
        raise TokenizerFileError(str(path), reason)
    extra_tokens = [_added_token(value, "additional_special_tokens", path) for value in extra]
    present = {token.content for token in backend.get_added_tokens_decoder().values()}
    missing = [t for t in [*named.values(), *extra_tokens] if t is not None and t.content not in present]
    if missing:
        backend.add_special_tokens(missing)
    return {key: token.content for key, token in named.items() if token is not None}


def _set_bos_eos_processor(backend: BackendTokenizer, config: dict, special: dict[str, str]) -> None:
    """Honour `add_bos_token`/`add_eos_token` for a tokenizer.json without a post-processor.

    When tokenizer.json has a post-processor it decides alone, as in transformers 5. Without one,
    transformers 5 adds nothing while transformers 4 honoured the config flags; we honour them, as
    a model trained with a BOS token needs it.
    """
    bos, eos = special.get("bos_token"), special.get("eos_token")
    add_bos = bool(config.get("add_bos_token", False)) and bos is not None
    add_eos = bool(config.get("add_eos_token", False)) and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    tokens = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=tokens
    )


def _generation_eos_ids(generation: dict, path: Path) -> list[int]:
    value = generation.get("eos_token_id")
    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        reason = f"eos_token_id must be an id or a list of ids, got {value!r}"
        raise TokenizerFileError(str(path), reason)
    return ids


def tokenizer_files(model_dir: str | Path) -> list[Path]:
    """Every file `Tokenizer.from_dir` reads from `model_dir` (those that exist)."""
    model_dir = Path(model_dir)
    named = [model_dir / name for name in (TOKENIZER_FILE, CONFIG_FILE, GENERATION_CONFIG_FILE, TEMPLATE_FILE)]
    extra = sorted((model_dir / EXTRA_TEMPLATES_DIR).glob("*.jinja")) if (model_dir / EXTRA_TEMPLATES_DIR).is_dir() else []
    return [path for path in named + extra if path.is_file()]


def _load_chat_templates(model_dir: Path, config: dict) -> dict[str, str]:
    """Templates from chat_template.jinja / additional_chat_templates/*.jinja, else from the config.

    As in transformers, template files take precedence over `chat_template` in the config.
    """
    files = {}
    if (model_dir / TEMPLATE_FILE).is_file():
        files["default"] = model_dir / TEMPLATE_FILE
    if (model_dir / EXTRA_TEMPLATES_DIR).is_dir():
        for path in sorted((model_dir / EXTRA_TEMPLATES_DIR).glob("*.jinja")):
            files[path.stem] = path
    if files:
        return {name: _read_text(path) for name, path in files.items()}
    return _config_templates(config.get("chat_template"), model_dir / CONFIG_FILE)


def _config_templates(value: object, path: Path) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(
        isinstance(t, Mapping) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
        for t in value
    ):
        return {t["name"]: t["template"] for t in value}
    raise TokenizerFileError(
        str(path), f"chat_template must be a string or a list of {{name, template}}, got {value!r:.80}"
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise TokenizerFileError(str(path), f"is not readable UTF-8 text ({err})") from err


def _byte_fallback_ids(backend: BackendTokenizer) -> frozenset[int]:
    """Ids of the <0xNN> tokens when the decoder merges runs of them (ByteFallback), else empty."""
    decoder = backend.decoder
    if decoder is None or not _has_byte_fallback(json.loads(decoder.__getstate__())):
        return frozenset()
    ids = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)


def _has_byte_fallback(decoder: object) -> bool:
    if not isinstance(decoder, dict):
        return False
    children = decoder.get("decoders", [])
    return decoder.get("type") == "ByteFallback" or any(_has_byte_fallback(d) for d in children)


def _unique_ids(ids: Sequence[int | None]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(i for i in ids if i is not None))
