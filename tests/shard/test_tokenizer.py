"""Tokenizer: encode/decode/chat templates equal transformers' on tiny in-test tokenizers.

Three model directories are built here, each trained on a few sentences with `tokenizers`:
- "llama3": byte-level BPE, BOS added by tokenizer.json's post-processor, Llama-3 template,
  extra eos ids in generation_config.json;
- "qwen": byte-level BPE, no BOS, ChatML template, eos/pad as AddedToken dicts;
- "spm": sentencepiece-style BPE with byte fallback and a Metaspace-like normalizer,
  `add_bos_token` in the config, and a list of named templates.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from shard.errors import ChatTemplateError, ShardError, TokenizerFileError
from shard.sampling import FinishReason, SamplingParams, StopChecker
from shard.tokenizer import IncrementalDecoder, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hearth runs language models across the computers in a household.",
    "naïve café, crème brûlée, jalapeño, Ærøskøbing and façade.",
    "Привет, мир! Как дела у модели сегодня?",
    "日本語のテキストも少し入れておきます。東京と大阪。",
    "Emoji too: 🙂 🚀 and a family 👨‍👩‍👧 with joiners.",
    "def add(a, b):\n    return a + b\n\n# numbers 12345 67890",
    "Tabs\tand  double  spaces, trailing space ",
]
SAMPLES = [
    "Hello world",
    " leading space and trailing ",
    "naïve café déjà vu",
    "Привет мир",
    "日本語と東京",
    "rare: 鬱 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦜",
    "mixed\n\nlines\twith tabs",
    "<|eot_id|> inside text",
    "",
]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = """{%- if tools %}
<|im_start|>system
You may call: {{ tools | tojson }}<|im_end|>
{% endif %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message.role) }}
    {%- endif %}
    {%- if loop.first and message.role != 'system' %}
<|im_start|>system
You are a helpful assistant. Today is {{ strftime_now('%Y') | length }} digits.<|im_end|>
    {% endif %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
PLAIN_TEMPLATE = (
    "{% for m in messages %}{% generation %}[{{ m.role | upper }}] {{ m.content }}{% endgeneration %}\n"
    "{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}{{ eos_token if false }}"
)
TOOL_TEMPLATE = "{{ bos_token }}TOOLS={{ tools | tojson }}{% for m in messages %}|{{ m.content }}{% endfor %}"

CHATS = [
    [{"role": "user", "content": "Hi there! Ça va? 🙂"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue.", "tool_calls": None},
        {"role": "user", "content": "Another, в Unicode: 日本"},
    ],
]


def train_bpe(special: list[str], byte_level: bool, vocab_size: int) -> BackendTokenizer:
    tok = BackendTokenizer(models.BPE(unk_token=None if byte_level else "<unk>"))
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def byte_level_tokenizer(special: list[str], bos: str | None) -> BackendTokenizer:
    tok = train_bpe(special, byte_level=True, vocab_size=400)
    tok.decoder = decoders.ByteLevel()
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
            ),
        ])
    return tok


def sentencepiece_tokenizer(add_bos: bool = True) -> BackendTokenizer:
    """Llama-2 style: byte-fallback BPE whose vocab has the 256 <0xNN> byte tokens."""
    trained = train_bpe(["<unk>", "<s>", "</s>"], byte_level=False, vocab_size=300)
    model = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for token in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = BackendTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
        )
    return tok


def added_token_dict(content: str) -> dict:
    return {
        "__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
        "rstrip": False, "single_word": False, "special": True,
    }


def write_model(path: Path, backend: BackendTokenizer, config: dict, generation: dict | None = None) -> Path:
    path.mkdir(parents=True)
    backend.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **config}
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    llama3_special = [
        "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    ]
    llama3 = byte_level_tokenizer(llama3_special, bos="<|begin_of_text|>")
    qwen = byte_level_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None)
    eot = llama3.token_to_id("<|eot_id|>")
    return {
        "llama3": write_model(
            root / "llama3", llama3,
            {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "chat_template": LLAMA3_TEMPLATE},
            generation={"bos_token_id": 0, "eos_token_id": [llama3.token_to_id("<|end_of_text|>"), eot]},
        ),
        "qwen": write_model(
            root / "qwen", qwen,
            {
                "bos_token": None, "eos_token": added_token_dict("<|im_end|>"),
                "pad_token": added_token_dict("<|endoftext|>"), "chat_template": CHATML_TEMPLATE,
            },
            generation={"eos_token_id": qwen.token_to_id("<|im_end|>")},
        ),
        "spm": write_model(
            root / "spm", sentencepiece_tokenizer(),
            {
                "bos_token": added_token_dict("<s>"), "eos_token": "</s>", "unk_token": "<unk>",
                "add_bos_token": True, "add_eos_token": False,
                "chat_template": [
                    {"name": "default", "template": PLAIN_TEMPLATE},
                    {"name": "tool_use", "template": TOOL_TEMPLATE},
                ],
            },
        ),
    }


@pytest.fixture(scope="module")
def pair(model_dirs: dict[str, Path], request: pytest.FixtureRequest):
    return Tokenizer.from_dir(model_dirs[request.param]), PreTrainedTokenizerFast.from_pretrained(
        model_dirs[request.param]
    )


ALL = pytest.mark.parametrize("pair", ["llama3", "qwen", "spm"], indirect=True)


@ALL
def test_special_token_ids_match_transformers(pair) -> None:
    ours, ref = pair
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.eos_token_ids[0] == ref.eos_token_id
    assert ours.vocab_size == len(ref)


@ALL
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(pair, add_special_tokens: bool) -> None:
    ours, ref = pair
    for text in SAMPLES + CORPUS:
        assert ours.encode(text, add_special_tokens) == ref.encode(text, add_special_tokens=add_special_tokens)


@ALL
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(pair, skip_special_tokens: bool) -> None:
    ours, ref = pair
    rng = random.Random(0)
    sequences = [ours.encode(text) for text in SAMPLES + CORPUS]
    sequences += [[rng.randrange(ours.vocab_size) for _ in range(20)] for _ in range(20)]
    for ids in sequences:
        assert ours.decode(ids, skip_special_tokens) == ref.decode(ids, skip_special_tokens=skip_special_tokens)


@ALL
def test_round_trip_of_text(pair) -> None:
    ours, _ = pair
    for text in SAMPLES + CORPUS:
        assert ours.decode(ours.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


@ALL
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(pair, add_generation_prompt: bool) -> None:
    ours, ref = pair
    for chat in CHATS:
        expected = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("pair", ["qwen", "spm"], indirect=True)
def test_chat_template_with_tools_matches_transformers(pair) -> None:
    ours, ref = pair
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {"city": "string"}}}]
    expected = ref.apply_chat_template(CHATS[0], tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(CHATS[0], tools=tools) == expected
    assert "météo" in expected  # tojson does not escape non-ASCII


def test_auto_tokenizer_agrees(model_dirs: dict[str, Path]) -> None:
    ref = AutoTokenizer.from_pretrained(model_dirs["llama3"])
    ours = Tokenizer.from_dir(model_dirs["llama3"])
    assert ours.encode(SAMPLES[2]) == ref.encode(SAMPLES[2])
    expected = ref.apply_chat_template(CHATS[1], tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(CHATS[1]) == expected


def test_eos_ids_join_tokenizer_and_generation_config(model_dirs: dict[str, Path]) -> None:
    tok = Tokenizer.from_dir(model_dirs["llama3"])
    assert tok.eos_token_ids == (tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>"))
    qwen = Tokenizer.from_dir(model_dirs["qwen"])
    assert qwen.eos_token_ids == (qwen.token_to_id("<|im_end|>"),) and qwen.bos_token_id is None
    spm = Tokenizer.from_dir(model_dirs["spm"])
    assert spm.bos_token_id == 1 and spm.eos_token_ids == (2,)
    assert spm.encode("hi")[0] == 1 and spm.encode("hi", add_special_tokens=False)[0] != 1


def test_template_errors_are_typed(model_dirs: dict[str, Path]) -> None:
    qwen = Tokenizer.from_dir(model_dirs["qwen"])
    with pytest.raises(ChatTemplateError, match="unknown role robot"):
        qwen.apply_chat_template([{"role": "robot", "content": "beep"}])
    with pytest.raises(ChatTemplateError, match="non-empty list"):
        qwen.apply_chat_template([])
    with pytest.raises(ChatTemplateError, match="no chat template named 'nope'"):
        qwen.apply_chat_template(CHATS[0], template_name="nope")
    with pytest.raises(ChatTemplateError, match="not plain JSON"):
        qwen.apply_chat_template([{"role": "user", "content": object()}])


def test_named_templates_select_tool_use_when_tools_given(model_dirs: dict[str, Path]) -> None:
    spm = Tokenizer.from_dir(model_dirs["spm"])
    assert spm.apply_chat_template(CHATS[0], tools=[{"name": "f"}]).startswith('<s>TOOLS=[{"name": "f"}]')
    assert spm.apply_chat_template(CHATS[0], template_name="default").startswith("[USER]")


def test_missing_chat_template_is_a_clear_error(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "plain"
    target.mkdir()
    (target / "tokenizer.json").write_bytes((model_dirs["qwen"] / "tokenizer.json").read_bytes())
    tok = Tokenizer.from_dir(target)  # tokenizer_config.json is optional
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        tok.apply_chat_template(CHATS[0])


def test_chat_template_jinja_file_takes_precedence(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "jinja"
    target.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (target / name).write_bytes((model_dirs["qwen"] / name).read_bytes())
    (target / "chat_template.jinja").write_text("{% for m in messages %}<{{ m.content }}>{% endfor %}")
    ref = PreTrainedTokenizerFast.from_pretrained(target)
    ours = Tokenizer.from_dir(target)
    assert ours.apply_chat_template(CHATS[1]) == ref.apply_chat_template(CHATS[1], tokenize=False)


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__.__mro__ }}",
        "{{ (1).__class__.__base__.__subclasses__() }}",
        "{% set ns = namespace(_x=1) %}",
        "{{ messages.append(1) }}",  # immutable sandbox: no mutating the caller's data
    ],
)
def test_sandbox_blocks_escapes(model_dirs: dict[str, Path], source: str) -> None:
    tok = Tokenizer(Tokenizer.from_dir(model_dirs["qwen"]).backend, {}, chat_templates={"default": source})
    with pytest.raises(ChatTemplateError, match="unsafe|starts with '_'"):
        tok.apply_chat_template(CHATS[0])


def test_template_syntax_error_is_typed(model_dirs: dict[str, Path]) -> None:
    tok = Tokenizer(Tokenizer.from_dir(model_dirs["qwen"]).backend, {}, chat_templates={"default": "{% for %}"})
    with pytest.raises(ChatTemplateError, match="does not compile"):
        tok.apply_chat_template(CHATS[0])


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("tokenizer.json", None, "tokenizer.json: is missing"),
        ("tokenizer.json", "{not json", "tokenizer.json: cannot be loaded"),
        ("tokenizer.json", '{"version": "1.0"}', "tokenizer.json: cannot be loaded"),
        ("tokenizer_config.json", "[1, 2", "tokenizer_config.json: is not readable JSON"),
        ("tokenizer_config.json", "[1, 2]", "tokenizer_config.json: must hold a JSON object"),
        ("tokenizer_config.json", '{"eos_token": 5}', "tokenizer_config.json: eos_token must be"),
        ("tokenizer_config.json", '{"chat_template": 7}', "tokenizer_config.json: chat_template must be"),
        ("generation_config.json", '{"eos_token_id": "x"}', "generation_config.json: eos_token_id"),
    ],
)
def test_bad_files_name_the_file(
    model_dirs: dict[str, Path], tmp_path: Path, name: str, content: str | None, match: str
) -> None:
    target = tmp_path / "bad"
    target.mkdir()
    for source in ("tokenizer.json", "tokenizer_config.json"):
        (target / source).write_bytes((model_dirs["llama3"] / source).read_bytes())
    if content is None:
        (target / name).unlink()
    else:
        (target / name).write_text(content)
    with pytest.raises(TokenizerFileError, match=match) as info:
        Tokenizer.from_dir(target)
    assert isinstance(info.value, ShardError) and info.value.path == str(target / name)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(TokenizerFileError, match="is not a directory"):
        Tokenizer.from_dir(tmp_path / "absent")


# ---- streaming detokenization -------------------------------------------------------------


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    decoder = IncrementalDecoder(tok, skip_special_tokens=skip_special_tokens)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@ALL
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_deltas_concatenate_to_decode(pair, skip_special_tokens: bool) -> None:
    ours, _ = pair
    texts = SAMPLES + CORPUS + [" ".join(CORPUS)]
    for text in texts:
        ids = ours.encode(text)
        deltas = stream(ours, ids, skip_special_tokens)
        assert "".join(deltas) == ours.decode(ids, skip_special_tokens)
        if not ours.byte_fallback_ids:
            assert deltas[-1] == ""  # nothing left over for well-formed text
        assert not any("\ufffd" in d for d in deltas)


@ALL
def test_incremental_decoding_of_random_ids_matches_decode(pair) -> None:
    ours, _ = pair
    rng = random.Random(1)
    for _ in range(60):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert "".join(stream(ours, ids)) == ours.decode(ids)


@pytest.mark.parametrize("name", ["llama3", "spm"])
def test_incremental_decoder_never_splits_a_character(model_dirs: dict[str, Path], name: str) -> None:
    tok = Tokenizer.from_dir(model_dirs[name])
    text = "鬱 🦜 𝔘"  # unseen in training: several tokens per character
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)
    deltas = stream(tok, ids)
    assert "".join(deltas) == text
    assert "" in deltas  # some ids completed no character
    assert all("\ufffd" not in d for d in deltas)


def test_flush_returns_an_unfinished_character(model_dirs: dict[str, Path]) -> None:
    tok = Tokenizer.from_dir(model_dirs["spm"])
    ids = tok.encode("a🦜", add_special_tokens=False)[:-1]  # cut inside the emoji's bytes
    decoder = tok.incremental_decoder()
    assert decoder.extend(ids) == "a"
    assert decoder.flush() == tok.decode(ids)[1:] and decoder.flush() == ""


def test_byte_fallback_run_is_held_until_it_ends(model_dirs: dict[str, Path]) -> None:
    tok = Tokenizer.from_dir(model_dirs["spm"])
    c, bad, u = tok.token_to_id("<0x63>"), tok.token_to_id("<0xBB>"), tok.token_to_id("u")
    # "c" alone is valid, but the run <0x63><0xBB> is not: the decoder turns both into U+FFFD
    assert tok.decode([c, bad, u]) == "\ufffd\ufffdu"
    decoder = tok.incremental_decoder()
    assert [decoder.push(c), decoder.push(bad), decoder.push(u)] == ["", "", "\ufffd\ufffdu"]
    eos = tok.token_to_id("</s>")  # a skipped special token does not end the run
    assert "".join(stream(tok, [c, eos, bad, u])) == tok.decode([c, eos, bad, u])


def test_add_bos_token_applies_when_tokenizer_json_has_no_post_processor(tmp_path: Path) -> None:
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    tok = Tokenizer.from_dir(write_model(tmp_path / "m", sentencepiece_tokenizer(add_bos=False), config))
    assert tok.encode("hi")[0] == 1 and tok.encode("hi", add_special_tokens=False)[0] != 1
    # transformers 5 ignores add_bos_token here (tokenizer.json decides); transformers 4 honoured it


def generate_text(tok: Tokenizer, ids: list[int], params: SamplingParams) -> tuple[str, FinishReason]:
    checker = StopChecker(params, tok.eos_token_ids, detokenizer=tok.incremental_decoder())
    text = ""
    for token in ids:
        step = checker.step(token)
        text += step.text
        if step.done:
            return text, step.finish
    return text + checker.flush(), None


def test_stop_checker_with_detokenizer_keeps_bytes_before_eos(model_dirs: dict[str, Path]) -> None:
    tok = Tokenizer.from_dir(model_dirs["spm"])
    ids = tok.encode("a 🦜", add_special_tokens=False) + [tok.token_to_id("</s>"), 5]
    assert generate_text(tok, ids, SamplingParams()) == ("a 🦜", FinishReason.STOP_TOKEN)


@pytest.mark.parametrize("name", ["llama3", "spm"])
def test_stop_string_across_real_tokens(model_dirs: dict[str, Path], name: str) -> None:
    tok = Tokenizer.from_dir(model_dirs[name])
    ids = tok.encode("The café. User: hi there", add_special_tokens=False)
    text, finish = generate_text(tok, ids, SamplingParams(stop_strings=("User:",)))
    assert (text, finish) == ("The café. ", FinishReason.STOP_STRING)


def test_length_stop_matches_decode_of_the_generated_ids(model_dirs: dict[str, Path]) -> None:
    tok = Tokenizer.from_dir(model_dirs["llama3"])
    ids = tok.encode("日本語と東京 and more", add_special_tokens=False)
    for n in range(1, len(ids)):
        text, finish = generate_text(tok, ids, SamplingParams(max_new_tokens=n))
        assert finish is FinishReason.LENGTH and text == tok.decode(ids[:n])
