"""Speculative decoding in the simulator: drafts of the stand-in's true continuation, checked by
the real client and nodes, keep the failure-free tokens in fewer passes."""

from __future__ import annotations

import random

import pytest

from simulations.compute import StandInWeights, reference_tokens
from simulations.drafts import ReferenceDrafter
from simulations.report import decode_summary, speculation_gain
from simulations.runner import run_scenario
from simulations.scenario import ModelShape, ScenarioError, load_scenario, scenario_from_dict
from tests.simulations.conftest import small

SHAPE = ModelShape(blocks=12, stand_in_hidden=64, vocab=97)
WEIGHTS = StandInWeights(SHAPE)
PROMPT = [5, 17, 33, 2, 9, 71, 4, 60]


def test_the_reference_drafter_follows_the_context_and_misses_at_its_rate():
    truth = reference_tokens(WEIGHTS, 12, PROMPT, 40)
    always = ReferenceDrafter(WEIGHTS, 12, acceptance=1.0, rng=random.Random(0))
    for chosen in range(0, 30, 3):  # the context grows by the chosen tokens, as a generation's does
        assert always.draft(PROMPT + truth[:chosen], 8).tokens == tuple(truth[chosen:chosen + 8])
    assert always.draft(PROMPT, 4).tokens == tuple(truth[:4])  # another context: recomputed
    never = ReferenceDrafter(WEIGHTS, 12, acceptance=0.0, rng=random.Random(0))
    wrong = never.draft(PROMPT, 8)
    assert len(wrong.tokens) == 8 and wrong.source == "reference"
    assert all(a != b for a, b in zip(wrong.tokens, truth))  # after a miss every guess is wrong
    drafter = ReferenceDrafter(WEIGHTS, 12, acceptance=0.8, rng=random.Random(1))
    right = checked = 0
    for _ in range(300):
        tokens = drafter.draft(PROMPT, 8).tokens
        assert len(tokens) == 8  # a lookup's whole text: the rows after a miss cost too
        kept = next((i for i, (a, b) in enumerate(zip(tokens, truth)) if a != b), len(tokens))
        assert all(a != b for a, b in zip(tokens[kept:], truth[kept:]))
        right, checked = right + kept, checked + kept + (kept < len(tokens))
    assert 0.75 < right / checked < 0.85


def test_the_scenario_checks_its_speculation_settings():
    for bad in ({"max_drafts": 0}, {"max_drafts": 16}, {"draft_acceptance": 1.5}, {"speculative": "yes"}):
        with pytest.raises(ScenarioError):
            scenario_from_dict({"clients": bad})
    scenario = load_scenario("speculative-30ms")
    assert scenario.clients.speculative and not scenario.scaled(speculative=False).clients.speculative


def test_speculation_keeps_drafts_and_the_tokens_of_a_run_without_it():
    scenario = small("speculative-30ms", nodes=6, clients=2, minutes=2, seed=3)
    on, off = run_scenario(scenario), run_scenario(scenario.scaled(speculative=False))
    assert on.ok and off.ok, (on.violations[:3], off.violations[:3])  # completed sessions match the reference
    assert on.sessions and all(s.outcome == "completed" for s in on.sessions + off.sessions)
    decode = decode_summary(on.sessions)["speculation"]
    assert decode["accepted"] > 0 and decode["passes"] < decode_summary(on.sessions)["tokens"] / 2
    assert all(s.passes == 0 for s in off.sessions)
    gain = speculation_gain(on, off)
    assert gain["compared_sessions"] >= 2 and gain["identical_tokens"]
    assert gain["ratio_paired"] > 1.5
