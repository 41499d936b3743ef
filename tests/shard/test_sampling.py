"""Sampling: parameters, HF-equal logit processing, seeded draws, replay, and stop conditions."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from shard.errors import InvalidSamplingParams, SamplingError, ShardError
from shard.sampling import (
    FinishReason,
    Sampler,
    SamplingParams,
    StopChecker,
    StopStep,
)

VOCAB = 97


def random_case(seed: int, batch: int = 4, vocab: int = VOCAB, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 3
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    return logits, ids


def hf_process(params: SamplingParams, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The chain transformers' generate() builds for these parameters (same order, same skips)."""
    chain = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(penalty=float(params.repetition_penalty)))
    if not params.greedy:
        if params.temperature != 1.0:
            chain.append(TemperatureLogitsWarper(float(params.temperature)))
        if params.top_k != 0:
            chain.append(TopKLogitsWarper(top_k=params.top_k))
        if params.top_p < 1.0:
            chain.append(TopPLogitsWarper(top_p=params.top_p))
    return chain(ids, logits.clone())


HF_CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=10),
    SamplingParams(temperature=0.8, top_p=0.9),
    SamplingParams(temperature=0.6, top_k=20, top_p=0.75, repetition_penalty=1.3),
    SamplingParams(temperature=1.0, top_p=0.05),  # keeps at least one token
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=2.0, top_k=500),  # k beyond the vocabulary
    SamplingParams(temperature=1.0, repetition_penalty=0.7),  # < 1 rewards repeats
    SamplingParams(repetition_penalty=1.5),  # greedy: only the penalty applies
]


@pytest.mark.parametrize(
    "params", HF_CASES, ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}-r{p.repetition_penalty}"
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_processing_matches_transformers(params: SamplingParams, seed: int) -> None:
    logits, ids = random_case(seed)
    ours = Sampler(params).process(logits, ids.tolist())
    theirs = hf_process(params, logits, ids)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = torch.isfinite(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=0, atol=0)
    torch.testing.assert_close(torch.softmax(ours, -1), torch.softmax(theirs, -1), rtol=0, atol=0)


def test_top_p_keeps_at_least_one_token_even_when_one_dominates() -> None:
    logits = torch.full((1, 10), -5.0)
    logits[0, 3] = 20.0
    scores = Sampler(SamplingParams(temperature=1.0, top_p=0.01, seed=0)).process(logits, [[]])
    assert torch.isfinite(scores).sum().item() == 1 and torch.isfinite(scores[0, 3])


def test_top_k_keeps_ties_like_transformers() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0]])
    scores = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0)).process(logits, [[]])
    assert torch.isfinite(scores).tolist() == [[False, True, True, False, True]]


def test_repetition_penalty_handles_ragged_histories_and_duplicates() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0]])
    scores = Sampler(SamplingParams(repetition_penalty=2.0)).process(logits, [[0, 1, 1, 0], []])
    assert scores.tolist() == [[1.0, -4.0, 1.0], [2.0, -2.0, 1.0]]


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_exact_argmax(seed: int) -> None:
    logits, ids = random_case(seed, batch=8, vocab=32000)
    sampler = Sampler(SamplingParams())
    assert sampler.sample(logits, ids.tolist()) == logits.argmax(dim=-1).tolist()
    assert sampler.draws == 0  # greedy consumes no randomness


def test_greedy_argmax_takes_first_of_ties() -> None:
    logits = torch.tensor([[0.0, 5.0, 5.0, 1.0]])
    assert Sampler(SamplingParams()).sample(logits, [[]]) == [1]


def test_greedy_with_repetition_penalty_matches_transformers_argmax() -> None:
    logits, ids = random_case(7, batch=6)
    params = SamplingParams(repetition_penalty=1.8)
    expected = hf_process(params, logits, ids).argmax(dim=-1).tolist()
    assert Sampler(params).sample(logits, ids.tolist()) == expected


def test_same_seed_same_tokens_and_different_seed_differs() -> None:
    params = SamplingParams(temperature=1.5, seed=1234)
    logits, ids = random_case(3, batch=3, vocab=1000)
    runs = []
    for seed in (1234, 1234, 99):
        sampler = Sampler(SamplingParams(temperature=1.5, seed=seed))
        runs.append([sampler.sample(logits, ids.tolist()) for _ in range(20)])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert Sampler(params).seed == 1234


def test_unseeded_sampler_draws_and_exposes_a_seed_that_reproduces_it() -> None:
    logits, ids = random_case(4, vocab=500)
    first = Sampler(SamplingParams(temperature=1.0))
    tokens = [first.sample(logits, ids.tolist()) for _ in range(10)]
    again = Sampler(SamplingParams(temperature=1.0, seed=first.seed))
    assert [again.sample(logits, ids.tolist()) for _ in range(10)] == tokens


def test_one_uniform_per_sequence_per_step() -> None:
    sampler = Sampler(SamplingParams(temperature=1.0, seed=5))
    logits, ids = random_case(5, batch=3)
    sampler.sample(logits, ids.tolist())
    sampler.sample(logits[:1], ids[:1].tolist())
    assert sampler.draws == 4


def test_state_restores_the_sampler_for_replay() -> None:
    params = SamplingParams(temperature=0.9, top_k=50, seed=42)
    sampler = Sampler(params)
    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(2, 300, generator=g) for _ in range(8)]
    history: list[list[int]] = [[], []]
    for logits in steps[:3]:
        for row, token in enumerate(sampler.sample(logits, history)):
            history[row].append(token)
    saved, saved_history = sampler.state(), [list(h) for h in history]
    tail = [sampler.sample(logits, history) for logits in steps[3:]]

    replica = Sampler(params)  # e.g. the client after a restart, or after a failed step
    replica.set_state(saved)
    assert replica.draws == saved.draws == 6
    assert [replica.sample(logits, saved_history) for logits in steps[3:]] == tail


def test_set_state_refuses_another_seed() -> None:
    state = Sampler(SamplingParams(temperature=1.0, seed=1)).state()
    with pytest.raises(SamplingError, match="seed 1"):
        Sampler(SamplingParams(temperature=1.0, seed=2)).set_state(state)


def test_draws_follow_the_processed_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = torch.log(probs).unsqueeze(0).expand(500, -1).contiguous()
    sampler = Sampler(SamplingParams(temperature=1.0, seed=11))
    counts = torch.zeros(5)
    for _ in range(20):
        for token in sampler.sample(logits, [[]] * 500):
            counts[token] += 1
    freq = counts / counts.sum()
    assert counts[4] == 0  # probability zero is never drawn
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_filtered_tokens_are_never_drawn() -> None:
    logits, ids = random_case(9, batch=8, vocab=200)
    logits, ids = logits.repeat(50, 1), ids.repeat(50, 1)  # 400 rows: many draws per call
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=3, top_p=0.8, seed=3))
    allowed = torch.isfinite(sampler.process(logits, ids.tolist()))
    for _ in range(5):
        tokens = sampler.sample(logits, ids.tolist())
        assert all(allowed[row, token] for row, token in enumerate(tokens))


def test_half_precision_logits_are_upcast() -> None:
    logits, _ = random_case(2, batch=2)
    sampler = Sampler(SamplingParams())
    assert sampler.sample(logits.bfloat16(), [[], []]) == logits.bfloat16().float().argmax(-1).tolist()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("top_k", -1),
        ("top_k", True),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", math.inf),
        ("seed", -1),
        ("seed", 2**64),
        ("stop_token_ids", (1, -2)),
        ("stop_token_ids", "12"),
        ("stop_strings", ("ok", "")),
    ],
)
def test_bad_params_name_field_and_value(field: str, value: object) -> None:
    with pytest.raises(InvalidSamplingParams) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, ShardError)


def test_params_accept_lists_and_store_tuples() -> None:
    params = SamplingParams(stop_token_ids=[3, 4], stop_strings=["\n\n"])
    assert params.stop_token_ids == (3, 4) and params.stop_strings == ("\n\n",)
    assert hash(params) == hash(SamplingParams(stop_token_ids=(3, 4), stop_strings=("\n\n",)))


@pytest.mark.parametrize(
    ("logits", "previous", "match"),
    [
        (torch.zeros(3), [[]], "batch, vocab"),
        (torch.zeros(2, 5), [[]], "2 rows"),
        (torch.zeros(1, 5, dtype=torch.long), [[]], "floating"),
        (torch.tensor([[0.0, math.nan]]), [[]], "NaN"),
        (torch.full((1, 4), -math.inf), [[]], "all -inf"),
    ],
)
def test_bad_logits_raise(logits: torch.Tensor, previous: list, match: str) -> None:
    with pytest.raises(SamplingError, match=match):
        Sampler(SamplingParams()).sample(logits, previous)


def test_overflowing_temperature_raises() -> None:
    with pytest.raises(SamplingError, match="temperature 1e-40"):
        Sampler(SamplingParams(temperature=1e-40, seed=0)).sample(torch.tensor([[1.0, 2.0]]), [[]])


def test_previous_id_outside_vocab_raises() -> None:
    with pytest.raises(SamplingError, match="previous token id 9"):
        Sampler(SamplingParams(repetition_penalty=1.2)).sample(torch.zeros(1, 5), [[1, 9]])


# ---- stop conditions ----------------------------------------------------------------------


def run_checker(checker: StopChecker, steps: list[tuple[int, str]]) -> tuple[str, list[StopStep]]:
    text, results = "", []
    for token, delta in steps:
        result = checker.step(token, delta)
        results.append(result)
        text += result.text
        if result.done:
            break
    return text, results


def test_eos_token_stops_and_its_text_is_not_shown() -> None:
    checker = StopChecker(SamplingParams(), eos_token_ids=[2])
    text, results = run_checker(checker, [(5, "Hello"), (6, " world"), (2, "</s>"), (7, "more")])
    assert text == "Hello world"
    assert results[-1].finish is FinishReason.STOP_TOKEN and checker.n_tokens == 3


def test_extra_stop_token_ids_stop_too() -> None:
    checker = StopChecker(SamplingParams(stop_token_ids=(13,)), eos_token_ids=[2])
    _, results = run_checker(checker, [(5, "a"), (13, "\n")])
    assert results[-1].finish is FinishReason.STOP_TOKEN


def test_stop_string_inside_one_delta_is_trimmed() -> None:
    checker = StopChecker(SamplingParams(stop_strings=("User:",)))
    text, results = run_checker(checker, [(1, "Sure."), (2, " Bye\nUser: hi"), (3, "x")])
    assert text == "Sure. Bye\n"
    assert results[-1].finish is FinishReason.STOP_STRING


def test_stop_string_split_across_tokens_is_held_back_then_trimmed() -> None:
    checker = StopChecker(SamplingParams(stop_strings=("<|end|>",)))
    text, results = run_checker(checker, [(1, "Done<"), (2, "|en"), (3, "d|>tail")])
    assert [r.text for r in results] == ["Done", "", ""]
    assert text == "Done" and results[-1].finish is FinishReason.STOP_STRING


def test_held_back_text_is_released_when_it_is_not_a_stop() -> None:
    checker = StopChecker(SamplingParams(stop_strings=("###",)))
    text, results = run_checker(checker, [(1, "a#"), (2, "#b"), (3, "c#"), (4, "!")])
    assert [r.text for r in results] == ["a", "##b", "c", "#!"]
    assert not results[-1].done


def test_earliest_of_several_stop_strings_wins() -> None:
    checker = StopChecker(SamplingParams(stop_strings=("world", "lo w")))
    text, _ = run_checker(checker, [(1, "hello world")])
    assert text == "hel"


def test_max_new_tokens_ends_and_releases_held_text() -> None:
    checker = StopChecker(SamplingParams(max_new_tokens=3, stop_strings=("STOP",)))
    text, results = run_checker(checker, [(1, "a"), (2, "b"), (3, "ST"), (4, "OP")])
    assert text == "abST"
    assert results[-1].finish is FinishReason.LENGTH and len(results) == 3


def test_stop_string_on_the_last_allowed_token_counts_as_stop_string() -> None:
    checker = StopChecker(SamplingParams(max_new_tokens=2, stop_strings=("OP",)))
    _, results = run_checker(checker, [(1, "ST"), (2, "OP")])
    assert results[-1].finish is FinishReason.STOP_STRING


def test_flush_releases_held_text_and_step_after_finish_raises() -> None:
    checker = StopChecker(SamplingParams(stop_strings=("\n\n",)))
    assert checker.step(1, "end\n").text == "end"
    assert checker.flush() == "\n"
    done = StopChecker(SamplingParams(max_new_tokens=1))
    assert done.step(1, "x").finish is FinishReason.LENGTH
    with pytest.raises(SamplingError, match="already finished"):
        done.step(2, "y")


class FakeDetokenizer:
    """Token id n decodes to the text in `pieces[n]`; the last piece is held until flush."""

    def __init__(self, pieces: dict[int, str]):
        self.pieces, self.pending = pieces, ""

    def push(self, token_id: int) -> str:
        out, self.pending = self.pending, self.pieces[token_id]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def test_detokenizer_is_flushed_in_order_when_the_sequence_ends() -> None:
    pieces = {1: "ab", 2: "S", 3: "T", 9: "<eos>"}
    checker = StopChecker(SamplingParams(stop_strings=("STOP",)), [9], detokenizer=FakeDetokenizer(pieces))
    results = [checker.step(t) for t in (1, 2, 3, 9)]
    assert [r.text for r in results] == ["", "ab", "", "ST"]  # "S" held as a possible stop start
    assert results[-1].finish is FinishReason.STOP_TOKEN


def test_text_completed_at_the_end_can_still_be_a_stop_string() -> None:
    pieces = {1: "x", 2: "ST", 3: "OP", 9: "<eos>"}
    checker = StopChecker(SamplingParams(stop_strings=("STOP",)), [9], detokenizer=FakeDetokenizer(pieces))
    results = [checker.step(t) for t in (1, 2, 3, 9)]
    assert "".join(r.text for r in results) == "x" and results[-1].finish is FinishReason.STOP_STRING


def test_length_stop_releases_detokenizer_text() -> None:
    pieces = {1: "a", 2: "b"}
    checker = StopChecker(SamplingParams(max_new_tokens=2), detokenizer=FakeDetokenizer(pieces))
    assert [checker.step(1).text, checker.step(2).text] == ["", "ab"]


def test_text_is_required_exactly_without_a_detokenizer() -> None:
    with pytest.raises(SamplingError, match="exactly when"):
        StopChecker(SamplingParams()).step(1)
    with pytest.raises(SamplingError, match="exactly when"):
        StopChecker(SamplingParams(), detokenizer=FakeDetokenizer({1: "a"})).step(1, "a")
