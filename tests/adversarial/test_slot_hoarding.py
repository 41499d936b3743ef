"""A peer hoarding a node's session slots, and steps that declare more than they carry (issue 18,
items 4 and 6), on the in-memory transport in virtual time: the attacks are logical, not about the
network. The honest client still gets exactly the tokens of a run without the attacker.

- One peer may hold at most `max_sessions_per_peer` sessions; the next is refused (retry elsewhere).
- Slots, not only KV bytes, are freed by evicting idle sessions, the hoarding peer's first: a
  session kept alive by a token every few minutes is idle in between.
- A step's tensor header is checked against the session (batch, room, hidden size) before a byte of
  it is decompressed or decoded: a 4 KB zstd frame declaring [1, 65536, H] is refused as it is.
"""

from __future__ import annotations

import numpy as np
import pytest
import trio

import node.server as node_server
from mesh.session import HopFailed, open_hop
from protocol import Codec
from shard.sampling import SamplingParams
from tests.mesh.test_failover_memory import PROMPT, TOKENS, FaultySwarm, expected  # noqa: F401 - fixture


@pytest.fixture
async def swarm(checkpoint_factory):
    async with trio.open_nursery() as nursery:
        yield FaultySwarm(checkpoint_factory("llama"), nursery)
        nursery.cancel_scope.cancel()


async def peer(swarm: FaultySwarm, name: str):
    """A transport of its own for peer `name` on the swarm's network, knowing the nodes' addresses."""
    transport = await swarm.nursery.start(swarm._transport, name)
    for record in await swarm.directory.lookup(swarm.digest):
        transport.add_peer_addrs(record.peer_id, list(record.addrs))
    return transport


async def open_session(swarm: FaultySwarm, transport, node: str, *, max_length: int = 1, codec: Codec = Codec.FP32):
    return await open_hop(transport, node, 0, 6, model_id="tiny", manifest_hash=swarm.digest,
                          max_length=max_length, batch=1, codec=codec, timeout=5.0, io_timeout=5.0,
                          data_channel=False)


async def honest_tokens(swarm: FaultySwarm) -> list[int]:
    client = await swarm.client(request_timeout_s=120.0)
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    return report.token_ids


def sample(node, name: str, **labels) -> float:
    return node.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_one_peer_cannot_take_every_slot(autojump_clock, swarm, expected):
    node = await swarm.add_node("a", 0, 6, max_sessions=4, max_sessions_per_peer=2)
    mallory = await peer(swarm, "mallory")
    hoard = [await open_session(swarm, mallory, "a") for _ in range(2)]
    with pytest.raises(HopFailed, match="holds 2 sessions here"):
        await open_session(swarm, mallory, "a")
    assert len(hoard) == 2 and await honest_tokens(swarm) == expected  # served at once, beside the hoard
    assert sample(node, "hearth_sessions_refused_total", code="overloaded") == 1


async def test_idle_hoarded_slots_are_evicted_for_an_honest_client(autojump_clock, swarm, expected):
    node = await swarm.add_node("a", 0, 6, max_sessions=2, max_sessions_per_peer=2)
    mallory = await peer(swarm, "mallory")
    hoard = [await open_session(swarm, mallory, "a", max_length=4) for _ in range(2)]
    for session in hoard:  # a token each, then quiet until the next keep-alive minutes later
        await session.step(np.zeros((1, 1, 64), np.float32), 0, timeout=5.0)
    await trio.sleep(node.manager.limits.evict_idle_s + 1)
    assert await honest_tokens(swarm) == expected
    assert sample(node, "hearth_sessions_ended_by_node_total", code="cache_full") == 1  # one hoarded slot freed
    with pytest.raises(HopFailed, match="evicted"):
        await hoard[0].step(np.zeros((1, 1, 64), np.float32), 1, timeout=5.0)


async def test_a_step_declaring_more_than_it_carries_is_refused_before_decompressing(autojump_clock, swarm,
                                                                                    monkeypatch):
    node = await swarm.add_node("a", 0, 6)
    decoded = []
    real_decode = node_server.decode_tensor

    def counting_decode(tensor, **kwargs):
        decoded.append(tensor.shape)
        return real_decode(tensor, **kwargs)

    monkeypatch.setattr(node_server, "decode_tensor", counting_decode)
    session = await open_session(swarm, await peer(swarm, "mallory"), "a", max_length=16, codec=Codec.FP32_ZSTD)
    bomb = np.zeros((1, 65536, 64), np.float32)  # 16 MiB of zeros: a few KB once compressed
    with pytest.raises(HopFailed, match=r"65536 tokens at position 0 overflow the session's 16 positions"):
        await session.step(bomb, 0, timeout=5.0)
    assert decoded == []  # refused on the header alone
    assert sample(node, "hearth_sessions_ended_by_node_total", code="cache_full") == 1

