"""Spot-check verification on the in-memory transport in virtual time (issue 19): a lying node is
caught, banned and its work redone, and the tokens the caller sees are an honest run's; honest
swarms, whatever their thread counts and batch compositions, are never accused."""

from __future__ import annotations

import logging

import pytest
import torch
import trio

from mesh.session import HopSession
from node.chaos import Chaos, parse_chaos
from node.node import Node
from node.sessions import SessionLimits
from shard.generate import generate_local
from shard.pipeline import LocalPipeline
from shard.sampling import SamplingParams
from shard.span import load_span
from tests.mesh.test_failover_memory import PROMPT, FaultySwarm

TOKENS = 16
GREEDY = SamplingParams(max_new_tokens=TOKENS)


@pytest.fixture
async def swarm(checkpoint_factory):
    async with trio.open_nursery() as nursery:
        yield FaultySwarm(checkpoint_factory("llama"), nursery)
        nursery.cancel_scope.cancel()


@pytest.fixture(scope="module")
def honest(checkpoint_factory):
    return generate_local(LocalPipeline.load(checkpoint_factory("llama")), PROMPT, GREEDY).token_ids


class Threaded:
    """A span that computes on `threads` torch threads (the nodes of one test share a process)."""

    def __init__(self, span, threads: int):
        self.span, self.threads = span, threads

    def _with_threads(self, method, *args):
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return method(*args)
        finally:
            torch.set_num_threads(before)

    def run(self, *args):
        return self._with_threads(self.span.run, *args)

    def run_batch(self, *args):
        return self._with_threads(self.span.run_batch, *args)

    def __getattr__(self, name):
        return getattr(self.span, name)


async def add(swarm: FaultySwarm, name: str, start: int, end: int, *, quant: str = "none", threads: int = 0,
              chaos: str | None = None, token_seconds: float = 0.001, kernels: str | None = None) -> Node:
    """A node like FaultySwarm's, with blocks quantized `quant`, on `threads` threads, misbehaving as
    `chaos` says, saying it computes with `kernels` (by default this process's, as the client's)."""
    transport = await swarm.nursery.start(swarm._transport, name)
    key = (start, end, quant)
    if key not in swarm.spans:
        swarm.spans[key] = load_span(swarm.model_dir, start, end, quant=quant)
    span = Threaded(swarm.spans[key], threads) if threads else swarm.spans[key]
    node = Node(span, "tiny", swarm.digest, wall_clock=trio.current_time, token_seconds=token_seconds,
                limits=SessionLimits(compute_in_thread=False),
                chaos=Chaos(parse_chaos(chaos, seed=7)) if chaos else None, kernels=kernels)
    await swarm.nursery.start(node.run, transport, swarm.directory)
    swarm.nodes[name] = node
    return node


async def two_per_span(swarm, liar: str | None = None, chaos: str = "corrupt:0.01", **kwargs) -> None:
    """a, b on the preferred route; c, d (slower) for the same blocks: the checkers; `liar` misbehaves."""
    for name, start, end, seconds in (("a", 0, 3, 0.001), ("b", 3, 6, 0.001), ("c", 0, 3, 0.01), ("d", 3, 6, 0.01)):
        await add(swarm, name, start, end, token_seconds=seconds, chaos=chaos if name == liar else None, **kwargs)


def peers(report) -> list[str]:
    return [hop["peer_id"] for hop in report.route]


@pytest.mark.parametrize("liar", ["a", "b"])
async def test_a_corrupting_route_node_is_caught_banned_and_the_output_is_honest(autojump_clock, swarm, honest, liar):
    await two_per_span(swarm, liar)
    client = await swarm.client(verify_rate=0.1)
    report = await client.generate_text(prompt_ids=PROMPT, params=GREEDY)
    assert report.token_ids == honest
    checked = report.verification
    assert checked.banned == [liar] and checked.disagreements == 1 and checked.rollbacks == 1
    assert liar not in peers(report) and [r.failed_peer for r in report.recoveries] == [liar]
    again = await client.generate_text(prompt_ids=PROMPT, params=GREEDY)  # banned for good: never planned again
    assert again.token_ids == honest and liar not in peers(again) and not again.verification.banned


async def test_tokens_are_released_only_once_checked(autojump_clock, swarm, honest):
    await two_per_span(swarm, "b")
    client = await swarm.client(verify_rate=0.25)
    seen, banned_when = [], []
    report = None
    from mesh.client import GenerationReport

    report = GenerationReport([])
    async for emitted in client.generate(prompt_ids=PROMPT, params=GREEDY, report=report):
        seen.append(emitted.token_id)
        banned_when.append(list(report.verification.banned))
    assert seen == honest  # not one token of the lying route reached the caller
    assert banned_when[0] == ["b"]  # caught at the first check, after the prompt step, before any token


async def test_corrupt_sometimes_is_caught_and_the_output_is_honest(autojump_clock, swarm, honest):
    await two_per_span(swarm, "b", chaos="corrupt-sometimes:0.01:0.2")
    client = await swarm.client(verify_rate=0.1)
    report = await client.generate_text(prompt_ids=PROMPT, params=GREEDY)
    assert report.token_ids == honest and report.verification.banned == ["b"]


async def test_seeded_sampling_is_rolled_back_with_the_tokens(autojump_clock, swarm, checkpoint_factory):
    await two_per_span(swarm, "a", chaos="corrupt-sometimes:0.02:0.3")
    params = SamplingParams(max_new_tokens=TOKENS, temperature=1.0, top_k=20, seed=5)
    client = await swarm.client(verify_rate=0.2)
    report = await client.generate_text(prompt_ids=PROMPT, params=params)
    local = generate_local(LocalPipeline.load(checkpoint_factory("llama")), PROMPT, params)
    assert report.token_ids == local.token_ids and report.verification.banned == ["a"]


async def test_a_lying_checker_is_banned_and_the_route_stands(autojump_clock, swarm, honest):
    await two_per_span(swarm, "d")  # d checks b's blocks
    client = await swarm.client(verify_rate=0.1)
    report = await client.generate_text(prompt_ids=PROMPT, params=GREEDY)
    assert report.token_ids == honest and report.verification.banned == ["d"]
    assert report.verification.rollbacks == 0 and not report.recoveries


async def test_a_third_node_arbitrates_and_the_liar_is_replaced(autojump_clock, swarm, honest, caplog):
    await two_per_span(swarm, "b")
    await add(swarm, "e", 3, 6, token_seconds=0.02)
    client = await swarm.client(verify_rate=0.1)
    with caplog.at_level(logging.WARNING, logger="hearth.client"):
        report = await client.generate_text(prompt_ids=PROMPT, params=GREEDY)
    assert report.token_ids == honest and report.verification.banned == ["b"]
    assert any("arbiter e" in record.getMessage() and "b lied" in record.getMessage() for record in caplog.records)
    assert report.verification.unchecked == 0  # b's replacement (d) is checked by e from then on


@pytest.mark.parametrize("checker_kernels, caught", [(None, True), ("torch 0.0; elsewhere", False)])
async def test_the_tolerance_is_exact_between_equal_kernels_only(autojump_clock, swarm, honest, checker_kernels,
                                                                   caught):
    """A lie of 0.8% per row (a row distance of 0.007-0.009): caught by a checker with the hop's
    kernels (tolerance 0.005); within the rounding noise another CPU's kernels may show (0.015), so
    not caught by one, and no one is accused."""
    await two_per_span(swarm, "b", chaos="corrupt:0.008")
    await add(swarm, "e", 3, 6, token_seconds=0.005, kernels=checker_kernels)  # nearer than d: the checker
    swarm.nodes["d"].kernels = "torch 0.0; elsewhere"
    client = await swarm.client(verify_rate=0.1)
    report = await client.generate_text(prompt_ids=PROMPT, params=GREEDY)
    checked = report.verification
    if caught:
        assert report.token_ids == honest and checked.banned == ["b"]
    else:
        assert checked.disagreements == 0 and not checked.banned and 0.005 < checked.max_distance < 0.015


async def test_checkers_with_the_hops_kernels_come_first(autojump_clock, swarm, honest):
    """Of two checkers for b's blocks, the one with b's kernels is asked even when it is slower."""
    await two_per_span(swarm, "b", chaos="corrupt:0.008")
    swarm.nodes["d"].kernels = "torch 0.0; elsewhere"  # faster than e, different kernels
    await add(swarm, "e", 3, 6, token_seconds=0.05)
    client = await swarm.client(verify_rate=0.1)
    report = await client.generate_text(prompt_ids=PROMPT, params=GREEDY)
    assert report.token_ids == honest and report.verification.banned == ["b"]


async def test_a_failover_between_checks_goes_back_to_the_last_verified_step(autojump_clock, swarm, honest):
    await two_per_span(swarm)
    await add(swarm, "e", 3, 6, token_seconds=0.02)
    swarm.fail_at("b", 6, "crash")
    client = await swarm.client(verify_rate=0.1, seed=3)
    report = await client.generate_text(prompt_ids=PROMPT, params=GREEDY)
    assert report.token_ids == honest and [r.failed_peer for r in report.recoveries] == ["b"]
    assert report.verification.rollbacks == 1 and not report.verification.banned


async def test_a_stalling_node_is_replaced_by_the_step_timeout(autojump_clock, swarm, honest):
    await add(swarm, "a", 0, 6, chaos="stall:30")
    await add(swarm, "b", 0, 6, token_seconds=0.01)
    client = await swarm.client()
    report = await client.generate_text(prompt_ids=PROMPT, params=GREEDY)
    assert report.token_ids == honest and [r.failed_peer for r in report.recoveries] == ["a"]
    assert swarm.nodes["a"].manager.chaos.steps_stalled == 1


@pytest.mark.parametrize("seed, threads", [(0, (1, 1, 2, 1)), (1, (1, 1, 1, 1))])
async def test_an_honest_swarm_is_never_accused(autojump_clock, swarm, checkpoint_factory, seed, threads):
    """int8 spans (their decode steps batch), nodes on 1 or 2 threads, generations at once (every
    node's batches mix route and checker sessions of both), checks at seeded random steps.
    (100 seeded runs on real processes: benchmarks/bench_verify.py.)"""
    for name, start, end, count in zip("abcd", (0, 3, 0, 3), (3, 6, 3, 6), threads):
        await add(swarm, name, start, end, quant="int8", threads=count)
    prompts = [PROMPT, [100 + seed, 3, 8, 8]]
    reports = [None] * len(prompts)
    client = await swarm.client(verify_rate=0.3, seed=seed)  # one client, as an API server's
    params = SamplingParams(max_new_tokens=12)

    async def one(index: int) -> None:
        reports[index] = await client.generate_text(prompt_ids=prompts[index], params=params)

    async with trio.open_nursery() as nursery:
        for index in range(len(prompts)):
            nursery.start_soon(one, index)
    local = LocalPipeline.load(checkpoint_factory("llama"), quant="int8")
    for prompt, report in zip(prompts, reports):
        checked = report.verification
        assert checked.checks >= 2 * 2 and checked.disagreements == 0 and not checked.banned
        assert checked.max_distance == 0.0  # same machine: an honest recomputation is bit-identical
        assert report.token_ids == generate_local(local, prompt, params).token_ids


async def test_verification_off_checks_nothing(autojump_clock, swarm, honest, monkeypatch):
    await two_per_span(swarm)
    steps = []
    original = HopSession.step

    async def counting(self, hidden, position, **kwargs):
        steps.append(self.peer_id)
        return await original(self, hidden, position, **kwargs)

    monkeypatch.setattr(HopSession, "step", counting)
    client = await swarm.client()
    report = await client.generate_text(prompt_ids=PROMPT, params=GREEDY)
    assert report.token_ids == honest and set(steps) == {"a", "b"}
    assert report.verification.to_json() == {"rate": 0.0, "checks": 0, "disagreements": 0, "banned": [],
                                             "rollbacks": 0, "tokens_redone": 0, "unchecked": 0, "max_distance": 0.0}
