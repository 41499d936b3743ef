"""Which nodes a client sends hidden states to: its trusted peers (`ClientOptions.trusted_peers`) and
a household's shared secret (`mesh.swarm_secret`), on the real node and client code in memory."""

from __future__ import annotations

import pytest
import trio

from mesh.client import ClientOptions
from mesh.routing import NoRouteError
from mesh.session import HopFailed, open_hop
from mesh.swarm_secret import SwarmSecret, refusal_reason
from node.node import Node
from node.sessions import SessionLimits
from protocol import Codec
from shard.errors import InvalidInput
from shard.sampling import SamplingParams
from shard.span import load_span
from tests.mesh.test_client_memory import PROMPT, Swarm, local_tokens

HOUSE = SwarmSecret(b"correct horse battery staple 42")
OTHER = SwarmSecret(b"another household's secret, 32b")
PARAMS = SamplingParams(max_new_tokens=6)


class HouseholdSwarm(Swarm):
    """`Swarm` whose nodes may hold a swarm secret, and which counts the steps each node computes."""

    steps: dict[str, int]

    async def add_node(self, name: str, start: int, end: int, token_seconds: float = 0.001, *,
                       secret: SwarmSecret | None = None) -> Node:
        transport = await self.nursery.start(self._transport, name)
        node = Node(load_span(self.model_dir, start, end), "tiny", self.digest, limits=SessionLimits(),
                    wall_clock=trio.current_time, token_seconds=token_seconds, swarm_secret=secret)
        original = node.manager.step

        async def counted(*args, **kwargs):
            self.steps[name] = self.steps.get(name, 0) + 1
            return await original(*args, **kwargs)

        node.manager.step = counted
        await self.nursery.start(node.run, transport, self.directory)
        self.nodes[name] = node
        return node


@pytest.fixture
async def swarm(checkpoint_factory):
    async with trio.open_nursery() as nursery:
        household = HouseholdSwarm(checkpoint_factory("llama"), nursery)
        household.steps = {}
        yield household
        nursery.cancel_scope.cancel()


async def test_a_client_routes_only_through_its_trusted_peers(swarm):
    await swarm.add_node("a", 0, 3)
    await swarm.add_node("b", 3, 6)
    await swarm.add_node("stranger", 0, 6, token_seconds=0.0001)  # faster, and one hop: preferred if trusted
    client = await swarm.client("user", trusted_peers=frozenset({"a", "b"}))
    report = await client.generate_text(prompt_ids=PROMPT, params=PARAMS)
    assert report.token_ids == local_tokens(swarm.model_dir, 6)
    assert [hop["peer_id"] for hop in report.route] == ["a", "b"]
    assert "stranger" not in swarm.steps
    assert [peer for peer, _, _ in await client.covering(0, 3)] == ["a"]  # spot checks' checkers too
    untrusting = await swarm.client("other")
    report = await untrusting.generate_text(prompt_ids=PROMPT, params=PARAMS)
    assert [hop["peer_id"] for hop in report.route] == ["stranger"]


async def test_no_trusted_route_is_named(swarm):
    await swarm.add_node("a", 0, 3)
    await swarm.add_node("b", 3, 6)
    client = await swarm.client("user", trusted_peers=frozenset({"a"}), request_timeout_s=1.0)
    with pytest.raises(NoRouteError) as err:
        await client.generate_text(prompt_ids=PROMPT, params=PARAMS)
    assert err.value.missing == [(3, 6)]
    assert "no trusted peer (1 untrusted peers left out) serves [3, 6)" in str(err.value)
    assert "b" not in swarm.steps


async def test_a_household_serves_and_routes_only_within_itself(swarm):
    await swarm.add_node("a", 0, 3, secret=HOUSE)
    await swarm.add_node("b", 3, 6, secret=HOUSE)
    await swarm.add_node("outsider", 0, 6, token_seconds=0.0001)  # no secret: faster, one hop
    await swarm.add_node("impostor", 0, 6, token_seconds=0.0001, secret=OTHER)
    member = await swarm.client("member", swarm_secret=HOUSE)
    report = await member.generate_text(prompt_ids=PROMPT, params=PARAMS)
    assert report.token_ids == local_tokens(swarm.model_dir, 6)
    assert [hop["peer_id"] for hop in report.route] == ["a", "b"]
    assert {"outsider", "impostor"}.isdisjoint(swarm.steps)
    assert "outsider" in member.untrusted  # answered without a proof: left out by the member
    assert "proof of this swarm's secret" in member.refusals["impostor"]  # refused the member's proof


@pytest.mark.parametrize("secret", [None, OTHER], ids=["no-secret", "wrong-secret"])
async def test_a_household_node_refuses_peers_without_the_proof(swarm, secret):
    await swarm.add_node("a", 0, 6, secret=HOUSE)
    stranger = await swarm.client("stranger", swarm_secret=secret, request_timeout_s=1.0)
    with pytest.raises(NoRouteError) as err:  # the probe is refused: no route, and why
        await stranger.generate_text(prompt_ids=PROMPT, params=PARAMS)
    assert "refused us" in str(err.value) and "proof of this swarm's secret" in str(err.value)
    with pytest.raises(HopFailed) as refused:  # a session asked for directly: refused before it opens
        await open_hop(stranger.transport, "a", 0, 6, model_id="tiny", manifest_hash=swarm.digest, max_length=16,
                       batch=1, codec=Codec.FP32, timeout=2.0, io_timeout=2.0, swarm=secret)
    assert "proof of this swarm's secret" in str(refused.value) and not refused.value.retry_elsewhere
    assert not swarm.nodes["a"].manager.sessions and "a" not in swarm.steps


async def test_a_member_refuses_a_node_without_the_proof(swarm):
    await swarm.add_node("outsider", 0, 6)
    member = await swarm.client("member", swarm_secret=HOUSE, request_timeout_s=1.0)
    with pytest.raises(NoRouteError, match=r"no trusted peer \(1 untrusted peers left out\) serves \[0, 6\)"):
        await member.generate_text(prompt_ids=PROMPT, params=PARAMS)
    with pytest.raises(HopFailed, match="not trusted: peer outsider gave no proof"):  # and at a session's open
        await open_hop(member.transport, "outsider", 0, 6, model_id="tiny", manifest_hash=swarm.digest,
                       max_length=16, batch=1, codec=Codec.FP32, timeout=2.0, io_timeout=2.0, swarm=HOUSE)
    assert "outsider" not in swarm.steps


def test_a_proof_is_bound_to_its_peer_id_and_secret():
    proof = HOUSE.proof("12D3KooWAlice")
    assert len(proof) == 32 and HOUSE.verify("12D3KooWAlice", proof)
    assert not HOUSE.verify("12D3KooWMallory", proof)  # replayed under another id
    assert not OTHER.verify("12D3KooWAlice", proof)
    assert refusal_reason(None, "anyone", b"") is None
    assert "no proof" in refusal_reason(HOUSE, "12D3KooWAlice", b"")
    assert "a wrong proof" in refusal_reason(HOUSE, "12D3KooWAlice", OTHER.proof("12D3KooWAlice"))
    assert SwarmSecret.from_text(b"  correct horse battery staple 42\n") == HOUSE
    assert "correct horse" not in repr(HOUSE)
    with pytest.raises(InvalidInput, match="at least 16 bytes, got 5"):
        SwarmSecret(b"short")


def test_client_options_check_trust_settings():
    with pytest.raises(InvalidInput, match="frozenset of peer ids"):
        ClientOptions(trusted_peers={"a"})
    with pytest.raises(InvalidInput, match="SwarmSecret"):
        ClientOptions(swarm_secret=b"correct horse battery staple 42")
