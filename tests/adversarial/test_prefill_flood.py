"""A peer monopolizing a node's compute by prefilling long prompts over and over (rewinding its
session to position 0, or opening new sessions), on the in-memory transport in virtual time.

- Each remote peer's prefill is paid from a budget of its own (`max_prefill_tokens_per_minute`);
  past it the step is refused with OVERLOADED, retry elsewhere, naming the limit and the refill.
- Meanwhile an honest client on another peer id gets exactly the tokens of a run without the attacker.
- An honest client refused for its budget fails over to another node rather than waiting.
"""

from __future__ import annotations

import numpy as np
import pytest
import trio

from mesh.session import HopFailed
from protocol import Retry
from shard.generate import generate_local
from shard.pipeline import LocalPipeline
from shard.sampling import SamplingParams
from tests.adversarial.test_slot_hoarding import honest_tokens, open_session, peer, sample
from tests.mesh import test_failover_memory
from tests.mesh.test_failover_memory import PROMPT, TOKENS, FaultySwarm

expected = test_failover_memory.expected  # the fixture: the tokens of a run on one machine

CONTEXT = 128  # the tiny model's whole context
BUDGET = 2 * CONTEXT  # tokens of prefill per peer per minute


@pytest.fixture
async def swarm(checkpoint_factory):
    async with trio.open_nursery() as nursery:
        yield FaultySwarm(checkpoint_factory("llama"), nursery)
        nursery.cancel_scope.cancel()


async def flood(swarm: FaultySwarm, mallory, rounds: int, outcomes: list[str], refusals: list[HopFailed]) -> None:
    """Mallory's loop: prefill a whole context, rewind to 0 and prefill it again; when refused,
    open a new session and go on."""
    prompt = np.ones((1, CONTEXT, 64), np.float32)
    session = await open_session(swarm, mallory, "a", max_length=CONTEXT)
    for _ in range(rounds):
        try:
            session.rewind(0)  # Step.rewind from the second round on
            await session.step(prompt, 0, timeout=5.0)
            outcomes.append("served")
        except HopFailed as err:
            outcomes.append("refused")
            refusals.append(err)
            session = await open_session(swarm, mallory, "a", max_length=CONTEXT)


async def test_a_peer_re_prefilling_in_a_loop_is_refused_past_its_budget(autojump_clock, swarm, expected):
    node = await swarm.add_node("a", 0, 6, max_prefill_tokens_per_minute=BUDGET)
    mallory = await peer(swarm, "mallory")
    outcomes: list[str] = []
    refusals: list[HopFailed] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood, swarm, mallory, 12, outcomes, refusals)
        assert await honest_tokens(swarm) == expected  # served beside the flood, on its own budget
    assert trio.current_time() < 30  # the test ran well within the minute: next to nothing refilled
    assert outcomes == ["served"] * (BUDGET // CONTEXT) + ["refused"] * (12 - BUDGET // CONTEXT)
    assert all(err.retry is Retry.BUSY for err in refusals)  # go elsewhere now, ask this node again later
    assert "used its prefill budget here (256 tokens a minute); 128 tokens refill in" in refusals[0].reason
    assert sample(node, "hearth_sessions_ended_by_node_total", code="overloaded") == len(refusals)
    await trio.sleep(60)  # a minute later the budget is back: mallory is limited, not banned
    outcomes.clear()
    await flood(swarm, mallory, 3, outcomes, refusals)
    assert outcomes == ["served", "served", "refused"]


async def test_a_client_refused_for_its_budget_fails_over_to_another_node(autojump_clock, swarm, checkpoint_factory):
    node = await swarm.add_node("a", 0, 6, max_prefill_tokens_per_minute=BUDGET)
    await swarm.add_node("b", 0, 6, token_seconds=0.01)  # slower: the client prefers a
    client = await swarm.client(request_timeout_s=120.0)
    node.manager.prefill_budgets.charge("user", BUDGET, trio.current_time())  # its minute spent on a
    prompt = PROMPT * 3  # more than 16 positions: prefill (a token and its drafts are free, as decode steps)
    params = SamplingParams(max_new_tokens=TOKENS)
    report = await client.generate_text(prompt_ids=prompt, params=params)
    assert report.token_ids == generate_local(LocalPipeline.load(checkpoint_factory("llama")), prompt, params).token_ids
    [recovery] = report.recoveries
    assert (recovery.failed_peer, recovery.replacements) == ("a", ["b"])
    assert "prefill budget" in recovery.reason
