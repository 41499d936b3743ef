"""Displacing the peer cache with throwaway identities (security issue item 9).

Every peer a client or node dials enters its peer cache, and a rejoin without bootstrap hosts dials
the cached peers. An attacker who makes us probe many identities of its own (cheap: a key each)
used to push the honest peers out of the newest-first cache, so the rejoin reached only it. The
cache now keeps the peers that served us (credited by the client when a generation completes) over
any number that never did, and dials them first; a peer whose hop failed ranks below those that did
not fail.
"""

from __future__ import annotations

import json

import pytest
import trio

from mesh.client import Client, ClientOptions
from mesh.memory_transport import DEFAULT_SEGMENT, MemoryNetwork, MemoryTransport, memory_addr
from mesh.peer_cache import PeerCache, rejoin
from protocol import Codec
from shard.generate import generate_local
from shard.pipeline import LocalPipeline
from shard.sampling import SamplingParams
from tests.mesh.test_failover_memory import PROMPT, FaultySwarm, two_routes
from tests.mesh.test_peer_cache import Ticker

THROWAWAYS = 200
TOKENS = 4


class CachingTransport(MemoryTransport):
    """The in-memory transport with a peer cache, credited and faulted as `Libp2pTransport` does."""

    cache: PeerCache

    def report_service(self, peer_id: str, *, ok: bool) -> None:
        if ok:
            self.cache.credit(peer_id, self.known.get(peer_id, []))
        else:
            self.cache.fault(peer_id)


def flood(cache: PeerCache, count: int = THROWAWAYS) -> None:
    """`count` attacker identities, each probed once (newer than every honest peer), at addresses
    where nobody answers by the time we rejoin."""
    for i in range(count):
        cache.remember(f"evil{i}", [memory_addr(DEFAULT_SEGMENT, f"evil-host{i}", f"evil{i}")])


@pytest.fixture(scope="module")
def expected(checkpoint_factory):
    return generate_local(LocalPipeline.load(checkpoint_factory("llama")), PROMPT,
                          SamplingParams(max_new_tokens=TOKENS)).token_ids


@pytest.fixture
async def swarm(checkpoint_factory):
    async with trio.open_nursery() as nursery:
        yield FaultySwarm(checkpoint_factory("llama"), nursery)
        nursery.cancel_scope.cancel()


async def test_throwaway_identities_do_not_push_out_the_peers_that_served(tmp_path):
    path = tmp_path / "peers.json"
    network = MemoryNetwork()
    async with MemoryTransport.open(network, "a"), MemoryTransport.open(network, "b"), \
            MemoryTransport.open(network, "user") as user:
        cache = PeerCache(path, clock=Ticker())
        for honest in ("a", "b"):
            cache.remember(honest, [memory_addr(DEFAULT_SEGMENT, honest, honest)])
            cache.credit(honest)
        flood(cache)
        assert len(cache.peers()) == cache.max_peers
        cache.save()
        cache = PeerCache(path, clock=Ticker())  # a restart, bootstrap hosts gone
        assert {p.peer_id for p in cache.peers()[:2]} == {"a", "b"}
        with trio.fail_after(5):
            reached = await rejoin(user, cache, timeout=1)
        assert sorted(reached) == ["a", "b"]


async def test_the_client_credits_the_peers_that_carried_its_generation(autojump_clock, tmp_path, swarm, expected):
    await two_routes(swarm)  # a, b preferred; c, d spares
    path = tmp_path / "peers.json"
    cache = PeerCache(path, clock=Ticker())
    for node in swarm.nodes:  # probed, as the libp2p transport remembers every peer it reaches
        cache.remember(node, [memory_addr(DEFAULT_SEGMENT, node, node)])
    transport = await swarm.nursery.start(_caching_transport, swarm.network, "user", cache)
    client = Client(transport, swarm.directory, swarm.model_dir, options=ClientOptions(codec=Codec.FP32))
    swarm.fail_at("b", 2, "crash")
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    assert report.token_ids == expected and [hop["peer_id"] for hop in report.route] == ["a", "d"]
    saved = {p["peer_id"]: (p["served"], p["failures"]) for p in json.loads(path.read_text())["peers"]}
    assert saved == {"a": (1, 0), "b": (0, 1), "c": (0, 0), "d": (1, 0)}  # a first service is news: saved at once
    flood(cache)
    cache.save()
    cache = PeerCache(path, clock=Ticker())  # a restart, bootstrap hosts gone
    assert {p.peer_id for p in cache.peers()[:2]} == {"a", "d"}
    assert {"b", "c"}.isdisjoint(p.peer_id for p in cache.peers())  # never served: pushed out like any newcomer
    async with MemoryTransport.open(swarm.network, "user-again") as restarted:
        with trio.fail_after(5):
            reached = await rejoin(restarted, cache, timeout=1)
    assert sorted(reached) == ["a", "d"]


async def _caching_transport(network: MemoryNetwork, name: str, cache: PeerCache, *,
                             task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with CachingTransport.open(network, name) as transport:
        transport.cache = cache
        task_status.started(transport)
        await trio.sleep_forever()
