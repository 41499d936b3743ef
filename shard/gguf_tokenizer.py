"""A GGUF file's tokenizer metadata (llama.cpp's `tokenizer.*` keys) as Hearth's `Tokenizer`.

Owns rebuilding, from what llama.cpp's converter writes (tokens by id, token types, merges or
scores, special ids, add-BOS/EOS flags, chat templates), the `tokenizers` backend of the Hugging
Face tokenizer the file was converted from, so that both give the same ids:
- "gpt2": byte-level BPE with `tokenizer.ggml.merges`, split by the Hugging Face pre-tokenizer of
  the models llama.cpp names in `tokenizer.ggml.pre`;
- "llama": SentencePiece BPE with byte fallback, its merges rebuilt from `tokenizer.ggml.scores`
  as transformers' SentencePiece conversion does, "▁" prepended to each text chunk (legacy Llama).
Control and unknown tokens become special added tokens, user-defined ones plain added tokens, so
both are matched whole in text.

Not in the metadata, so not reproduced: added tokens' lstrip/rstrip, the `special` flag of added
tokens the converter marks control only by their look (`<|...|>`), and generation_config.json's eos
ids other than the eos/eot/eom ids.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from shard.errors import TokenizerFileError
from shard.tokenizer import Tokenizer, _set_bos_eos_processor

MODEL = "tokenizer.ggml.model"
PRE = "tokenizer.ggml.pre"
TOKENS = "tokenizer.ggml.tokens"
TOKEN_TYPES = "tokenizer.ggml.token_type"
SCORES = "tokenizer.ggml.scores"
MERGES = "tokenizer.ggml.merges"
ADD_BOS = "tokenizer.ggml.add_bos_token"
ADD_EOS = "tokenizer.ggml.add_eos_token"
ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
CHAT_TEMPLATE = "tokenizer.chat_template"  # named ones are "tokenizer.chat_template.<name>"

# Hearth's special token name -> the metadata key of its id
SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "sep_token": "tokenizer.ggml.seperator_token_id",  # sic: llama.cpp's spelling
    "pad_token": "tokenizer.ggml.padding_token_id",
    "mask_token": "tokenizer.ggml.mask_token_id",
}
EXTRA_EOS_IDS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")

# tokenizer.ggml.token_type values (gguf.TokenType); 5 (unused) and 6 (byte) stay plain vocabulary,
# 0 is llama.cpp's "undefined"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4
_TOKEN_TYPES = range(0, 7)
_KIND_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean"}

# The split regexes of the tokenizer.json files of Qwen2 and Llama 3 (llama.cpp rewrites their
# case-insensitive group for its regex engine; the original is what the Hugging Face tokenizer runs).
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp gives these names BPE's ignore_merges (a word that is a token is kept whole) and a
# default BOS, as Llama 3's tokenizer.json does
_LLAMA3_NAMES = frozenset({"llama-bpe", "llama3", "llama-v3"})


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


def _regex_split(pattern: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    def make() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    return make


# tokenizer.ggml.pre -> the Hugging Face pre-tokenizer of the models llama.cpp gives that name
PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": _gpt2_split,
    "gpt-2": _gpt2_split,
    "smollm": _digits_then_gpt2_split,
    "starcoder": _digits_then_gpt2_split,
    "qwen2": _regex_split(QWEN2_REGEX),
    **{name: _regex_split(LLAMA3_REGEX) for name in _LLAMA3_NAMES},
}


def tokenizer_from_gguf(metadata: Mapping[str, Any], source: str) -> Tokenizer:
    """The tokenizer a GGUF file's metadata describes; `source` names the file in errors."""
    meta = _Metadata(metadata, source)
    model = meta.get(MODEL, str)
    tokens = meta.tokens()
    types = meta.token_types(len(tokens))
    if model == "gpt2":
        pre = meta.get(PRE, str, default="default")
        backend = _byte_level_backend(tokens, meta.merges(tokens), pre, meta)
        add_bos_default = pre in _LLAMA3_NAMES
    elif model == "llama":
        add_space_prefix = meta.get(ADD_SPACE_PREFIX, bool, default=True)
        unk = meta.token_id(SPECIAL_IDS["unk_token"], len(tokens))
        scores = meta.scores(len(tokens))
        backend = _sentencepiece_backend(tokens, types, scores, unk, add_space_prefix)
        add_bos_default = True
    else:
        raise meta.error(f"{MODEL} {model!r} is not supported (supported: 'gpt2', 'llama')")
    named_ids = {name: meta.token_id(key, len(tokens)) for name, key in SPECIAL_IDS.items()}
    special = {name: tokens[i] for name, i in named_ids.items() if i is not None}
    _add_tokens(backend, tokens, types, special_ids={i for i in named_ids.values() if i is not None})
    flags = {  # llama.cpp's defaults, which need no check: BOS only when there is one
        "add_bos_token": meta.get(ADD_BOS, bool, default=add_bos_default and "bos_token" in special),
        "add_eos_token": meta.get(ADD_EOS, bool, default=False),
    }
    for flag, name in (("add_bos_token", "bos_token"), ("add_eos_token", "eos_token")):
        if flags[flag] and name not in special:
            raise meta.error(f"{flag} is set but {SPECIAL_IDS[name]} is missing")
    if flags["add_bos_token"] or flags["add_eos_token"]:
        _set_bos_eos_processor(backend, flags, special)
    eos_ids = [i for key in EXTRA_EOS_IDS if (i := meta.token_id(key, len(tokens))) is not None]
    return Tokenizer(backend, special, eos_ids, meta.chat_templates(), source=source)


def _byte_level_backend(
    tokens: list[str], merges: list[tuple[str, str]], pre: str, meta: _Metadata
) -> BackendTokenizer:
    make_pre_tokenizer = PRE_TOKENIZERS.get(pre)
    if make_pre_tokenizer is None:
        raise meta.error(f"{PRE} {pre!r} is not supported (supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = BackendTokenizer(models.BPE(vocab, merges, ignore_merges=pre in _LLAMA3_NAMES))
    backend.pre_tokenizer = make_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(
    tokens: list[str], types: list[int], scores: list[float], unk: int | None, add_space_prefix: bool
) -> BackendTokenizer:
    """Llama's SentencePiece BPE as transformers' LlamaConverter builds it (legacy normalizer)."""
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = sentencepiece_merges(tokens, types, scores)
    unk_token = None if unk is None else tokens[unk]
    backend = BackendTokenizer(
        models.BPE(vocab, merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True)
    )
    prefix = [normalizers.Prepend("▁")] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    return backend


def sentencepiece_merges(
    tokens: Sequence[str], types: Sequence[int], scores: Sequence[float]
) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's scores: each split of a normal piece into two.

    Ranked as transformers ranks them: the joined piece's score (highest first), then its id, then
    the shorter left part first (SentencePiece, like llama.cpp, merges the leftmost of two equal
    pairs first).
    """
    normal = {token: i for i, token in enumerate(tokens) if types[i] == NORMAL}
    ranked = []
    for token, i in normal.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], i, cut, left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def _add_tokens(backend: BackendTokenizer, tokens: list[str], types: list[int], special_ids: set[int]) -> None:
    """Make control, unknown and named special tokens special added tokens, user-defined ones added."""
    special = [i for i, kind in enumerate(types) if kind in (CONTROL, UNKNOWN) or i in special_ids]
    user = [i for i, kind in enumerate(types) if kind == USER_DEFINED and i not in special_ids]
    # metadata tokens are the text they match (llama.cpp's converter stores them pre-normalized)
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])


class _Metadata:
    """Typed, checked reads of the metadata; each failure names the key and the file."""

    def __init__(self, metadata: Mapping[str, Any], source: str):
        self.metadata = metadata
        self.source = source

    def error(self, reason: str) -> TokenizerFileError:
        return TokenizerFileError(self.source, reason)

    def get(self, key: str, kind: type, default: Any = None) -> Any:
        value = self.metadata.get(key, default)
        if value is None:
            raise self.error(f"{key} is missing")
        if type(value) is not kind:
            raise self.error(f"{key} must be a {_KIND_NAMES[kind]}, got {value!r:.80}")
        return value

    def array(self, key: str, kind: type, length: int | None) -> list:
        value = self.metadata.get(key)
        if value is None:
            raise self.error(f"{key} is missing")
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise self.error(f"{key} must be an array, got {type(value).__name__}")
        if length is not None and len(value) != length:
            raise self.error(f"{key} has {len(value)} entries but {TOKENS} has {length}")
        kinds = (int, float) if kind is float else (kind,)
        bad = next((i for i, v in enumerate(value) if type(v) not in kinds), None)
        if bad is not None:
            raise self.error(f"{key}[{bad}] must be a {_KIND_NAMES[kind]}, got {value[bad]!r:.80}")
        return list(value)

    def tokens(self) -> list[str]:
        tokens = self.array(TOKENS, str, None)
        if not tokens:
            raise self.error(f"{TOKENS} is empty")
        return tokens

    def token_types(self, n_tokens: int) -> list[int]:
        if TOKEN_TYPES not in self.metadata:
            return [NORMAL] * n_tokens  # optional, as in llama.cpp
        types = self.array(TOKEN_TYPES, int, n_tokens)
        bad = next((i for i, kind in enumerate(types) if kind not in _TOKEN_TYPES), None)
        if bad is not None:
            raise self.error(f"{TOKEN_TYPES}[{bad}] is {types[bad]}, not a token type (0-6)")
        return types

    def scores(self, n_tokens: int) -> list[float]:
        return [float(score) for score in self.array(SCORES, float, n_tokens)]

    def merges(self, tokens: list[str]) -> list[tuple[str, str]]:
        known = set(tokens)
        merges = []
        for i, entry in enumerate(self.array(MERGES, str, None)):
            parts = entry.split(" ")
            if len(parts) != 2 or not all(parts):
                raise self.error(f"{MERGES}[{i}] is {entry!r:.80}, not two tokens joined by one space")
            left, right = parts
            missing = next((t for t in (left, right, left + right) if t not in known), None)
            if missing is not None:
                raise self.error(f"{MERGES}[{i}] {entry!r:.80} needs {missing!r:.80}, which is not in {TOKENS}")
            merges.append((left, right))
        return merges

    def token_id(self, key: str, n_tokens: int) -> int | None:
        value = self.metadata.get(key)
        if value is None:
            return None
        if type(value) is not int or not 0 <= value < n_tokens:
            raise self.error(f"{key} is {value!r:.80}, not a token id below {n_tokens}")
        return value

    def chat_templates(self) -> dict[str, str]:
        templates = {}
        for key, value in self.metadata.items():
            if key == CHAT_TEMPLATE:
                name = "default"
            elif key.startswith(CHAT_TEMPLATE + "."):
                name = key[len(CHAT_TEMPLATE) + 1 :]
            else:
                continue
            if not isinstance(value, str):
                raise self.error(f"{key} must be a string, got {type(value).__name__}")
            templates[name] = value
        return templates
