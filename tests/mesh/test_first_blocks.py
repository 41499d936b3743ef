"""The client's own first blocks (`mesh.first_blocks`): same tokens as a route over every block, also
through a failover; what the first hop receives is no longer the embeddings; the default holds the
embedding-table attack down (tools/inversion.py, benchmarks/bench_privacy.py)."""

from __future__ import annotations


import numpy as np
import pytest
import trio

from mesh.client import ClientOptions
from mesh.first_blocks import AUTO_BLOCKS, FirstBlocks, choose_local_blocks
from node.demo import DEMO_MODEL
from protocol import Codec
from shard.errors import InvalidInput
from shard.head import load_head
from shard.model_dir import open_model_dir
from shard.sampling import SamplingParams
from tests.mesh.test_client_memory import PROMPT, Swarm, local_tokens
from tests.mesh.test_failover_memory import FaultySwarm
from tools.inversion import embedding_attack, prompt_hidden, recovered_share

TOKENS = 12


@pytest.fixture
async def swarm(checkpoint_factory):
    async with trio.open_nursery() as nursery:
        yield Swarm(checkpoint_factory("llama"), nursery)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def faulty(checkpoint_factory):
    async with trio.open_nursery() as nursery:
        yield FaultySwarm(checkpoint_factory("llama"), nursery)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("k", [1, 2, 4])
async def test_local_blocks_give_the_tokens_of_a_route_over_every_block(swarm, k):
    await swarm.add_node("a", 0, 3)
    await swarm.add_node("b", 3, 6)
    client = await swarm.client("user", local_blocks=k)
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    assert report.token_ids == local_tokens(swarm.model_dir, TOKENS)
    assert report.local_blocks == k and report.route[0]["start"] == k and report.route[-1]["end"] == 6
    if k >= 3:  # node a's blocks all ran here: the route skips it
        assert [hop["peer_id"] for hop in report.route] == ["b"]


async def test_the_first_hop_receives_the_local_blocks_output_not_embeddings(swarm):
    first = await swarm.add_node("a", 0, 3)
    await swarm.add_node("b", 3, 6)
    received = []
    original = first.manager.step

    async def recording(session, hidden, position, *rest, **kwargs):
        received.append(hidden.copy())
        return await original(session, hidden, position, *rest, **kwargs)

    first.manager.step = recording
    client = await swarm.client("user", local_blocks=1)
    await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=2))
    embeddings = client.head.embed_tokens(PROMPT)
    assert received[0].shape == embeddings.shape and not np.allclose(received[0], embeddings, atol=1e-3)
    local = client.first_blocks.start(len(PROMPT))
    np.testing.assert_array_equal(received[0], await local.run(embeddings, 0))


@pytest.mark.parametrize("how", ["crash", "freeze"])
async def test_local_blocks_survive_a_node_killed_mid_answer(autojump_clock, faulty, how):
    await faulty.add_node("a", 0, 3)
    await faulty.add_node("b", 3, 6)
    await faulty.add_node("c", 0, 3, token_seconds=0.01)
    await faulty.add_node("d", 3, 6, token_seconds=0.01)
    faulty.fail_at("a", 5, how)  # the first remote hop, mid-answer
    client = await faulty.client(local_blocks=2)
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    assert report.token_ids == local_tokens(faulty.model_dir, TOKENS)
    [recovery] = report.recoveries
    assert (recovery.failed_peer, recovery.start, recovery.end, recovery.replacements) == ("a", 2, 3, ["c"])
    assert [(hop["peer_id"], hop["start"]) for hop in report.route] == [("c", 2), ("b", 3)]


async def test_a_rewound_generation_recomputes_the_local_blocks(checkpoint_factory):
    blocks = FirstBlocks.load(open_model_dir(checkpoint_factory("llama")), 2)
    head = load_head(checkpoint_factory("llama"))
    run = blocks.start(16)
    first = await run.run(head.embed_tokens(PROMPT), 0)
    await run.run(head.embed_tokens([3]), len(PROMPT))
    again = await run.run(head.embed_tokens(PROMPT[3:]), 3)  # back to position 3, as a rollback does
    np.testing.assert_allclose(again, first[:, 3:], atol=1e-5)
    with pytest.raises(InvalidInput, match="position 20"):
        await run.run(head.embed_tokens([3]), 20)


def test_choosing_how_many_blocks_run_here():
    sizes = dict(block_bytes=100 << 20, cache_bytes=28 << 20)
    assert choose_local_blocks(AUTO_BLOCKS, 30, available_bytes=8 << 30, **sizes) == 1
    assert choose_local_blocks(AUTO_BLOCKS, 30, available_bytes=256 << 20, **sizes) == 0  # not 4x room
    assert choose_local_blocks(AUTO_BLOCKS, 1, available_bytes=8 << 30, **sizes) == 0  # a peer must have work
    assert choose_local_blocks(3, 30, available_bytes=0, **sizes) == 3  # asked for: no memory guess
    with pytest.raises(InvalidInput, match="leave no block"):
        choose_local_blocks(30, 30, available_bytes=8 << 30, **sizes)
    for bad in (-1, "two", True, 1.5):
        with pytest.raises(InvalidInput, match="local blocks"):
            ClientOptions(local_blocks=bad)


async def test_auto_runs_one_block_where_memory_allows(swarm):
    await swarm.add_node("a", 0, 6)
    client = await swarm.client("user", local_blocks=AUTO_BLOCKS)
    assert client.local_blocks == 1  # a test machine has far more than 4x a tiny block
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=4))
    assert report.token_ids == local_tokens(swarm.model_dir, 4) and report.route[0]["start"] == 1


def test_the_default_keeps_the_embedding_lookup_below_5_percent():
    """The attack the README's old claim fell to: the first hop looks each vector it receives up in
    the embedding table (nearest by L2 and by cosine, the better of the two). On the bundled model,
    at the default (auto: one block on any machine that runs the tests), it must recover < 5% of a
    prompt's tokens; with no local block it recovers all of them. (Attacks that run the blocks
    themselves recover much more: benchmarks/RESULTS.md, docs/security.md.)"""
    model = open_model_dir(DEMO_MODEL)
    head, tokenizer = load_head(model), model.tokenizer()
    prompts = [tokenizer.encode(text) for text in (
        "My bank PIN is 4921 and my account number is 5512 0034 7781.",
        "Dear Dr. Alvarez, the biopsy results came back and I am worried.",
        "def transfer(account, amount, pin='4921'):\n    return bank.send(account, amount)\n",
    )]
    default = FirstBlocks.load(model, AUTO_BLOCKS)
    assert default is not None and default.count == 1
    assert recovered_share(embedding_attack(head, prompt_hidden(head, None, prompts, Codec.FP16)), prompts) == 1.0
    share = recovered_share(embedding_attack(head, prompt_hidden(head, default.span, prompts, Codec.FP16)), prompts)
    assert share < 0.05
