"""Speculative decoding and prefix reuse on the in-memory transport, in virtual time.

Greedy and seeded-sampling output with speculation equals output without it (for many prompts and
draft lengths, and with a hop killed mid-answer); rejected drafts leave nothing in any node's cache
(compared with a fresh computation fed only the accepted tokens); a kept route serves the next turn
from its prefix, also after its node died. A step going back without saying so: tests/adversarial.
"""

from __future__ import annotations

import pytest
import torch
import trio

from mesh.speculative import Draft, DraftLength, PromptLookup
from shard.generate import generate_local
from shard.head import load_head
from shard.pipeline import LocalPipeline
from shard.sampling import SamplingParams
from shard.span import load_span
from shard import qkernels
from tests.mesh.test_failover_memory import PROMPT, FaultySwarm, swarm, two_routes  # noqa: F401 - swarm: a fixture

needs_kernels = pytest.mark.skipif(not qkernels.available(), reason=f"prefix reuse needs the compiled kernels: "
                                   f"{qkernels.why_unavailable()}")

TOKENS = 40
PROMPTS = [PROMPT, [3, 8, 3, 8, 3, 8, 11], [60, 61, 62, 63, 60, 61, 62], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]


@pytest.fixture(scope="module")
def local(checkpoint_factory):
    pipeline = LocalPipeline.load(checkpoint_factory("llama"))

    def tokens(prompt: list[int], params: SamplingParams) -> list[int]:
        return generate_local(pipeline, prompt, params).token_ids

    return tokens


@pytest.fixture
async def int8_swarm(checkpoint_factory):
    """Nodes of int8 spans: chunk-invariant (row-exact linears, the compiled attention), so routes are kept."""
    async with trio.open_nursery() as nursery:
        yield FaultySwarm(checkpoint_factory("llama"), nursery, quant="int8")
        nursery.cancel_scope.cancel()


@pytest.fixture(scope="module")
def local8(checkpoint_factory):
    """One process, the same int8 blocks, the whole prompt in one step (however the route was fed)."""
    pipeline = LocalPipeline.load(checkpoint_factory("llama"), quant="int8")

    def tokens(prompt: list[int], params: SamplingParams) -> list[int]:
        return generate_local(pipeline, prompt, params).token_ids

    return tokens


def test_prompt_lookup_drafts_what_followed_the_latest_match_of_the_longest_ngram():
    lookup = PromptLookup(max_ngram=3)
    assert lookup.draft([1, 2, 3, 9, 9, 1, 2, 3], 4) == Draft((9, 9, 1, 2), "lookup-3")
    assert lookup.draft([1, 2, 3, 9, 9, 1, 2, 3, 9], 2) == Draft((9, 1), "lookup-3")  # the extension, indexed
    assert lookup.draft([5, 6, 7, 6], 3) == Draft((7, 6), "lookup-1")  # another sequence: indexed afresh
    assert lookup.draft([5, 6, 7, 8], 3) is None
    assert lookup.draft([4, 1, 4, 2, 4], 1) == Draft((2,), "lookup-1")  # the latest occurrence
    assert lookup.draft([1, 2, 1], 0) is None


def test_draft_length_follows_acceptance_and_the_cost_of_a_token():
    lengths = DraftLength(max_drafts=8)
    draft = Draft(tuple(range(8)), "lookup-2")
    lengths.observe_pass(1, 0.030)
    lengths.observe_pass(5, 0.034)  # a token costs 1 ms beside a 30 ms pass
    for _ in range(20):
        lengths.observe_drafts("lookup-2", 8, 8)
    assert lengths.choose(draft) == 8
    for _ in range(100):
        lengths.observe_drafts("lookup-2", 4, 0)  # never kept: no drafts, but for a probe now and then
    assert [lengths.choose(draft) for _ in range(32)] == ([0] * 15 + [1]) * 2
    assert lengths.choose(None) == 0
    expensive = DraftLength(max_drafts=8)
    expensive.observe_pass(1, 0.010)
    expensive.observe_pass(5, 0.050)  # each token costs as much as a pass (token by token)
    for _ in range(20):
        expensive.observe_drafts("lookup-2", 2, 1)
    assert 0 <= expensive.choose(draft) < 3


@pytest.mark.parametrize("max_drafts", [1, 3, 8, 15])
async def test_greedy_output_with_speculation_equals_output_without(autojump_clock, swarm, local, max_drafts):
    await two_routes(swarm)
    client = await swarm.client(speculative=True, max_drafts=max_drafts)
    accepted = 0
    for prompt in PROMPTS:
        params = SamplingParams(max_new_tokens=TOKENS)
        report = await client.generate_text(prompt_ids=prompt, params=params)
        assert report.token_ids == local(prompt, params)
        assert report.speculation.enabled and report.speculation.passes < TOKENS
        accepted += report.speculation.accepted
    assert accepted > TOKENS  # drafts were kept: fewer passes than tokens
    assert all(not node.manager.sessions for node in swarm.nodes.values())  # every session closed


async def test_seeded_sampling_with_speculation_is_reproducible(autojump_clock, swarm, local):
    await two_routes(swarm)
    client = await swarm.client(speculative=True)
    accepted = 0
    for seed in range(6):
        params = SamplingParams(max_new_tokens=TOKENS, temperature=0.5, top_k=4, seed=seed)
        report = await client.generate_text(prompt_ids=PROMPTS[seed % len(PROMPTS)], params=params)
        assert report.token_ids == local(PROMPTS[seed % len(PROMPTS)], params)
        accepted += report.speculation.accepted
    assert accepted > 0


@pytest.mark.parametrize("step", [0, 2, 6])
async def test_a_hop_killed_mid_answer_with_speculation_gives_identical_output(autojump_clock, swarm, local, step):
    await two_routes(swarm)
    swarm.fail_at("b", step, "crash")
    client = await swarm.client(speculative=True)
    params = SamplingParams(max_new_tokens=TOKENS)
    report = await client.generate_text(prompt_ids=PROMPTS[2], params=params)
    assert report.token_ids == local(PROMPTS[2], params)
    [recovery] = report.recoveries
    assert (recovery.failed_peer, recovery.replacements) == ("b", ["d"])
    assert report.speculation.accepted > 0


@needs_kernels
async def test_rejected_drafts_leave_no_trace_in_any_nodes_cache(autojump_clock, int8_swarm, checkpoint_factory):
    swarm = int8_swarm
    await swarm.add_node("a", 0, 3)
    await swarm.add_node("b", 3, 6)
    client = await swarm.client(speculative=True, keep_sessions_s=60.0)  # kept: the caches can be read
    report = await client.generate_text(prompt_ids=PROMPTS[3], params=SamplingParams(max_new_tokens=TOKENS))
    assert report.speculation.accepted > 0 and report.speculation.accepted < report.speculation.drafted  # some rejected
    fed = PROMPTS[3] + report.token_ids[:-1]  # the last token was chosen, never sent
    model = checkpoint_factory("llama")
    head, spans = load_head(model), [load_span(model, 0, 3, quant="int8"), load_span(model, 3, 6, quant="int8")]
    caches = [span.new_cache(1, 128) for span in spans]
    hidden = head.embed_tokens(PROMPTS[3])  # a fresh session fed only the accepted tokens, one at a time
    steps = [hidden] + [head.embed_tokens([token]) for token in report.token_ids[:-1]]
    for step in steps:
        for span, cache in zip(spans, caches):
            step = span.run(step, cache)
    for name, cache in zip("ab", caches):
        [session] = swarm.nodes[name].manager.sessions.values()
        assert session.cache.length == len(fed) == cache.length
        assert torch.equal(session.cache.keys[..., : len(fed), :], cache.keys[..., : len(fed), :])
        assert torch.equal(session.cache.values[..., : len(fed), :], cache.values[..., : len(fed), :])
    await client.aclose()
    assert all(not node.manager.sessions for node in swarm.nodes.values())


@needs_kernels
async def test_a_kept_route_serves_the_next_turn_from_its_prefix(autojump_clock, int8_swarm, local8):
    swarm, local = int8_swarm, local8
    await two_routes(swarm)
    client = await swarm.client(keep_sessions_s=60.0, speculative=True)
    params = SamplingParams(max_new_tokens=12)
    first = await client.generate_text(prompt_ids=PROMPTS[3], params=params)
    served = {name: node.manager.tokens_served for name, node in swarm.nodes.items()}
    turn = PROMPTS[3] + first.token_ids + [40, 41, 42]  # the conversation so far and a new question
    second = await client.generate_text(prompt_ids=turn, params=params)
    assert second.token_ids == local(turn, params)
    assert second.reused_tokens == len(PROMPTS[3]) + len(first.token_ids) - 1  # all but the last answer token
    prefilled = swarm.nodes["b"].manager.tokens_served - served["b"]
    assert prefilled < len(turn)  # only the suffix and the answer were computed again
    # a different conversation shares a shorter prefix: cut inside the kept route's prompt step, still exact
    other = PROMPTS[3][:5] + [7, 7, 7]
    third = await client.generate_text(prompt_ids=other, params=params)
    assert third.token_ids == local(other, params) and third.reused_tokens == 5


@needs_kernels
async def test_a_kept_route_whose_node_died_replays_elsewhere(autojump_clock, int8_swarm, local8):
    swarm, local = int8_swarm, local8
    await two_routes(swarm)
    client = await swarm.client(keep_sessions_s=60.0)
    params = SamplingParams(max_new_tokens=8)
    first = await client.generate_text(prompt_ids=PROMPTS[1], params=params)
    swarm.network.crash("b")
    turn = PROMPTS[1] + first.token_ids + [9]
    second = await client.generate_text(prompt_ids=turn, params=params)
    assert second.token_ids == local(turn, params)
    assert second.reused_tokens > 0
    [recovery] = second.recoveries
    assert (recovery.failed_peer, recovery.replacements) == ("b", ["d"])


@needs_kernels
async def test_kept_routes_expire_and_their_sessions_close(autojump_clock, int8_swarm, local8):
    swarm, local = int8_swarm, local8
    await two_routes(swarm)
    client = await swarm.client(keep_sessions_s=30.0)
    params = SamplingParams(max_new_tokens=4)
    first = await client.generate_text(prompt_ids=PROMPTS[0], params=params)
    assert len(client.kept) == 1 and swarm.nodes["a"].manager.sessions
    await trio.sleep(31)
    turn = PROMPTS[0] + first.token_ids
    again = await client.generate_text(prompt_ids=turn, params=params)
    assert again.reused_tokens == 0 and again.token_ids == local(turn, params)
    assert len(client.kept) == 1  # the expired route closed, the new one kept
    await client.aclose()
    assert not any(node.manager.sessions for node in swarm.nodes.values())


async def test_routes_through_float_spans_are_not_kept(autojump_clock, swarm, local):
    """Float GEMMs round with the row count: a conversation fed in other steps could answer otherwise."""
    await two_routes(swarm)
    client = await swarm.client(keep_sessions_s=60.0)
    params = SamplingParams(max_new_tokens=4)
    first = await client.generate_text(prompt_ids=PROMPTS[0], params=params)
    assert len(client.kept) == 0 and not any(node.manager.sessions for node in swarm.nodes.values())
    turn = PROMPTS[0] + first.token_ids
    again = await client.generate_text(prompt_ids=turn, params=params)
    assert again.reused_tokens == 0 and again.token_ids == local(turn, params)


@needs_kernels
async def test_kept_routes_give_way_to_new_generations_within_a_nodes_per_peer_limit(autojump_clock, int8_swarm):
    swarm = int8_swarm
    await swarm.add_node("a", 0, 3, max_sessions_per_peer=2)
    await swarm.add_node("b", 3, 6, max_sessions_per_peer=2)
    client = await swarm.client(keep_sessions_s=60.0, max_kept_routes=2)
    params = SamplingParams(max_new_tokens=3)
    for prompt in ([9, 9, 1], [8, 8, 2], [7, 7, 3], [6, 6, 4]):  # no shared prefix: each opens a route
        report = await client.generate_text(prompt_ids=prompt, params=params)
        assert report.recoveries == [] and len(client.kept) <= 2
    assert [len(node.manager.sessions) for node in swarm.nodes.values()] == [2, 2]  # the last two kept


async def test_a_draft_model_on_the_client_drafts_and_the_output_is_unchanged(autojump_clock, swarm, local,
                                                                              checkpoint_factory):
    await two_routes(swarm)
    client = await swarm.client(speculative=True, draft_model=checkpoint_factory("llama"))  # the model itself
    params = SamplingParams(max_new_tokens=TOKENS)
    for prompt in PROMPTS[:2]:
        report = await client.generate_text(prompt_ids=prompt, params=params)
        assert report.token_ids == local(prompt, params)
        counts = report.speculation.sources["draft-model"]
        assert counts[1] >= 0.9 * counts[0] > 0  # its own drafts: nearly all kept
        assert report.speculation.passes < TOKENS / 2


def test_a_draft_model_must_share_the_vocabulary(checkpoint_factory):
    from mesh.draft_model import DraftModel
    from shard.errors import InvalidInput

    with pytest.raises(InvalidInput, match="a draft model must share the model's tokenizer"):
        DraftModel.load(checkpoint_factory("llama"), vocab_size=12345)
