"""The client's codec per hop (ClientOptions.codec = AUTO) over modelled links, in virtual time.

A client measures each peer's link from what it already exchanges (probes, steps): a slow link
gets the compact codec from the next session on, a fast one stays on fp16, an explicit codec wins,
and a hop replaced after a failure speaks the failed hop's codec.
"""

from __future__ import annotations

import pytest
import trio

from mesh.client import Client, ClientOptions
from mesh.memory_transport import Link, MemoryNetwork
from mesh.session import HopSession, LinkBook
from protocol import AUTO, Codec, Exchange
from shard.errors import InvalidInput
from shard.sampling import SamplingParams
from tests.mesh.test_failover_memory import FaultySwarm

PROMPT = [5, 17, 33, 2, 9, 71, 4]
SLOW = Link(latency_s=0.01, bandwidth_bps=200e3)  # a poor uplink: 25 kB/s
FAST = Link(latency_s=0.01, bandwidth_bps=1e9)  # a LAN


class LinkedSwarm(FaultySwarm):
    """In-memory nodes behind links of a given speed, and a client with the codec options asked for."""

    def __init__(self, model_dir, nursery: trio.Nursery, link: Link):
        super().__init__(model_dir, nursery)
        self.network = MemoryNetwork(default_link=link)

    async def client(self, **options) -> Client:
        transport = await self.nursery.start(self._transport, "user")
        return Client(transport, self.directory, self.model_dir, options=ClientOptions(**options))


@pytest.fixture
def linked(checkpoint_factory):
    async def make(nursery: trio.Nursery, link: Link) -> LinkedSwarm:
        return LinkedSwarm(checkpoint_factory("llama"), nursery, link)
    return make


def hop_codecs(monkeypatch) -> list[tuple[str, Codec]]:
    """Records (peer, codec) for every step a hop is sent."""
    seen, step = [], HopSession.step

    async def spying(self, *args, **kwargs):
        seen.append((self.peer_id, self.codec))
        return await step(self, *args, **kwargs)

    monkeypatch.setattr(HopSession, "step", spying)
    return seen


async def generate(client: Client, seen: list, tokens: int = 6) -> set[tuple[str, Codec]]:
    seen.clear()
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=tokens))
    assert len(report.token_ids) == tokens
    return set(seen)


def test_auto_is_the_default_and_an_unknown_codec_is_refused():
    assert ClientOptions().codec == AUTO
    with pytest.raises(InvalidInput, match="not a protocol.Codec"):
        ClientOptions(codec="fp8")


@pytest.mark.parametrize(("link", "then"), [(SLOW, Codec.INT8_BLOCK64), (FAST, Codec.FP16)], ids=["slow", "fast"])
async def test_a_slow_link_gets_the_compact_codec_and_a_fast_one_fp16(autojump_clock, linked, monkeypatch, link, then):
    async with trio.open_nursery() as nursery:
        swarm = await linked(nursery, link)
        await swarm.add_node("a", 0, 3)
        await swarm.add_node("b", 3, 6)
        client = await swarm.client()
        seen = hop_codecs(monkeypatch)
        assert await generate(client, seen) == {("a", Codec.FP16), ("b", Codec.FP16)}  # nothing measured yet
        estimate = client.links.estimate("a")
        if link is SLOW:  # measured from the probe and the steps, within a few percent
            assert estimate.bandwidth_bytes_per_s == pytest.approx(link.bandwidth_bps / 8, rel=0.05)
        else:  # the bytes explain microseconds: nothing to tell it from a fast link
            assert estimate is None
        assert await generate(client, seen) == {("a", then), ("b", then)}
        nursery.cancel_scope.cancel()


async def test_an_explicit_codec_wins_on_a_slow_link(autojump_clock, linked, monkeypatch):
    async with trio.open_nursery() as nursery:
        swarm = await linked(nursery, SLOW)
        await swarm.add_node("a", 0, 6)
        client = await swarm.client(codec=Codec.FP32)
        seen = hop_codecs(monkeypatch)
        for _ in range(2):
            assert await generate(client, seen) == {("a", Codec.FP32)}
        nursery.cancel_scope.cancel()


async def test_a_replacement_speaks_the_failed_hops_codec(autojump_clock, linked, monkeypatch):
    """So the replayed history reaches it as the same values the failed hop was sent, although its
    own link, never measured, would have started on fp16."""
    async with trio.open_nursery() as nursery:
        swarm = await linked(nursery, SLOW)
        await swarm.add_node("a", 0, 6)
        await swarm.add_node("spare", 0, 6, token_seconds=0.05)  # slower: planned on only when a fails
        client = await swarm.client()
        seen, step = [], HopSession.step

        async def record_then_crash_a_at_its_third_step(self, *args, **kwargs):
            seen.append((self.peer_id, self.codec))
            if seen.count(("a", Codec.INT8_BLOCK64)) == 3:
                swarm.network.crash("a")
            return await step(self, *args, **kwargs)

        monkeypatch.setattr(HopSession, "step", record_then_crash_a_at_its_third_step)
        assert await generate(client, seen) == {("a", Codec.FP16)}  # learns the link to a
        assert client.links.estimate("spare") is None
        seen.clear()
        report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=6))
        assert [r.replacements for r in report.recoveries] == [["spare"]]
        assert set(seen) == {("a", Codec.INT8_BLOCK64), ("spare", Codec.INT8_BLOCK64)}
        nursery.cancel_scope.cancel()


def test_the_link_book_keeps_every_size_it_saw():
    """A session's one prefill must not be pushed out by its many decode steps."""
    book = LinkBook(per_size=4)
    book.record("p", Exchange(20_000, 0.01 + 20_000 / 25_000))
    for _ in range(100):
        book.record("p", Exchange(400, 0.01 + 400 / 25_000))
    assert book.estimate("p").bandwidth_bytes_per_s == pytest.approx(25_000)
    assert book.estimate("someone else") is None
