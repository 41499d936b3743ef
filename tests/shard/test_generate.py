"""`generate_local`: the tokens and text a user sees, greedy and sampled, with stops."""

from __future__ import annotations

import pytest
import torch

from shard.generate import generate_local
from shard.pipeline import LocalPipeline
from shard.sampling import SamplingParams
from shard.tokenizer import Tokenizer
from tests.conftest import save_tiny_checkpoint
from tests.shard.test_tokenizer import sentencepiece_tokenizer, write_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    backend = sentencepiece_tokenizer()
    path = write_model(tmp_path_factory.mktemp("gen") / "model", backend,
                       {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    return save_tiny_checkpoint(path, "llama", vocab_size=backend.get_vocab_size(), eos_token_id=2)


def run(model_dir, params: SamplingParams, prompt: str = "Hello world", parts: int = 2):
    tokenizer = Tokenizer.from_dir(model_dir)
    streamed = []
    result = generate_local(LocalPipeline.load(model_dir, parts=parts), tokenizer.encode(prompt), params,
                            tokenizer=tokenizer, on_token=lambda e: streamed.append(e.text))
    return result, "".join(streamed), tokenizer


def test_greedy_tokens_are_the_argmax_and_streamed_text_is_the_decoded_text(model_dir):
    result, streamed, tokenizer = run(model_dir, SamplingParams(max_new_tokens=12))
    pipeline = LocalPipeline.load(model_dir)
    pipeline.start(1, 64)
    ids, expected = torch.tensor([result.prompt_ids]), []
    for _ in range(len(result.token_ids)):
        expected.append(int(pipeline.forward(ids)[0].argmax()))
        ids = torch.tensor([[expected[-1]]])
    assert result.token_ids == expected
    if result.finish_reason == "length":
        assert streamed == result.text == tokenizer.decode(result.token_ids)


def test_same_seed_same_sample_different_seed_different_sample(model_dir):
    params = SamplingParams(max_new_tokens=16, temperature=1.5, top_k=50, seed=7)
    first, second = run(model_dir, params)[0], run(model_dir, params, parts=3)[0]
    other = run(model_dir, SamplingParams(max_new_tokens=16, temperature=1.5, top_k=50, seed=8))[0]
    assert first.token_ids == second.token_ids
    assert first.token_ids != other.token_ids


def test_stop_string_cuts_the_text(model_dir):
    base, _, tokenizer = run(model_dir, SamplingParams(max_new_tokens=16, temperature=1.0, seed=1))
    text = tokenizer.decode(base.token_ids)
    stop = text[3:5]
    assert stop, "the sample is too short to pick a stop string from"
    result, streamed, _ = run(model_dir, SamplingParams(max_new_tokens=16, temperature=1.0, seed=1,
                                                        stop_strings=(stop,)))
    assert result.finish_reason == "stop_string"
    assert stop not in result.text and streamed == result.text
    assert text.startswith(result.text)


def test_stop_token_ends_the_sequence(model_dir):
    base = run(model_dir, SamplingParams(max_new_tokens=8))[0]
    stop_id = base.token_ids[2]
    result = run(model_dir, SamplingParams(max_new_tokens=8, stop_token_ids=(stop_id,)))[0]
    assert result.finish_reason == "stop_token"
    assert result.token_ids == base.token_ids[: base.token_ids.index(stop_id) + 1]


def test_a_decoding_rewound_to_a_checkpoint_chooses_the_same_tokens_and_text_again(model_dir):
    """What spot checks do after catching a liar (mesh.spot_check): forget the tokens since the last
    verified step, sampler, stop rules and detokenizer included, and choose them again."""
    from shard.generate import Decoding

    tokenizer = Tokenizer.from_dir(model_dir)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=20, seed=3, stop_strings=("zzz",))
    logits = [torch.randn(tokenizer.vocab_size, generator=torch.Generator().manual_seed(i)) for i in range(12)]
    decoding = Decoding(params, tokenizer.encode("Hello"), tokenizer=tokenizer)
    emitted = [decoding.accept(logits[i]) for i in range(5)]
    checkpoint = decoding.checkpoint()
    emitted += [decoding.accept(logits[i]) for i in range(5, 9)]
    tokens, text = list(decoding.token_ids), decoding.text
    decoding.rewind(checkpoint)
    assert decoding.token_ids == tokens[:5] and decoding.text == "".join(e.text for e in emitted[:5])
    again = [decoding.accept(logits[i]) for i in range(5, 9)]
    assert decoding.token_ids == tokens and decoding.text == text
    assert [(e.token_id, e.text) for e in again] == [(e.token_id, e.text) for e in emitted[5:]]
