"""The real node and client code over the in-memory transport: a pipeline across three peers."""

from __future__ import annotations

import dataclasses

import pytest
import trio

from mesh.client import Client, ClientOptions
from mesh.data_channel import DataChannels, SealedStream
from mesh.discovery import MemoryDirectory
from mesh.memory_transport import LOOPBACK, WILDCARD, MemoryNetwork, MemoryTransport, memory_addr
from mesh.routing import NoRouteError
from node.node import Node
from node.sessions import SessionLimits
from protocol import Codec
from shard.generate import generate_local
from shard.manifest import model_digest
from shard.pipeline import LocalPipeline
from shard.sampling import SamplingParams
from shard.span import load_span

PROMPT = [5, 17, 33, 2, 9, 71, 4]


class Swarm:
    """In-memory nodes serving spans of one checkpoint, and clients to talk to them."""

    def __init__(self, model_dir, nursery: trio.Nursery):
        self.model_dir, self.nursery = model_dir, nursery
        self.network = MemoryNetwork()
        self.directory = MemoryDirectory(trio.current_time)
        self.digest = model_digest(model_dir)
        self.nodes: dict[str, Node] = {}

    async def add_node(self, name: str, start: int, end: int, token_seconds: float = 0.001,
                       data_channels: DataChannels | None = None, *, listen=(WILDCARD,),
                       transport_class=MemoryTransport, **limits) -> Node:
        transport = await self.nursery.start(self._transport, name, listen, transport_class)
        node = Node(load_span(self.model_dir, start, end), "tiny", self.digest, limits=SessionLimits(**limits),
                    wall_clock=trio.current_time, token_seconds=token_seconds, data_channels=data_channels)
        await self.nursery.start(node.run, transport, self.directory)
        self.nodes[name] = node
        return node

    async def _transport(self, name: str, listen=(WILDCARD,), transport_class=MemoryTransport, *,
                         task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with transport_class.open(self.network, name, listen=listen) as transport:
            task_status.started(transport)
            await trio.sleep_forever()

    async def client(self, name: str, codec: Codec = Codec.FP32, **options) -> Client:
        transport = await self.nursery.start(self._transport, name)
        return Client(transport, self.directory, self.model_dir, options=ClientOptions(codec=codec, **options))


@pytest.fixture
async def swarm(checkpoint_factory):
    async with trio.open_nursery() as nursery:
        yield Swarm(checkpoint_factory("llama"), nursery)
        nursery.cancel_scope.cancel()


def local_tokens(model_dir, n: int, **sampling) -> list[int]:
    return generate_local(LocalPipeline.load(model_dir), PROMPT, SamplingParams(max_new_tokens=n, **sampling)).token_ids


async def test_three_hops_give_the_local_tokens(swarm):
    for name, (start, end) in {"a": (0, 2), "b": (2, 4), "c": (4, 6)}.items():
        await swarm.add_node(name, start, end)
    client = await swarm.client("user")
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=8))
    assert report.token_ids == local_tokens(swarm.model_dir, 8)
    assert [hop["peer_id"] for hop in report.route] == ["a", "b", "c"]


async def test_each_hop_report_splits_its_round_trips_between_the_client_the_node_and_the_way_between(swarm):
    for name, (start, end) in {"a": (0, 3), "b": (3, 6)}.items():
        await swarm.add_node(name, start, end, data_channels=DataChannels("127.0.0.1") if name == "b" else None)
    client = await swarm.client("user")
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=4))
    for hop in report.hops:  # one clock for both ends here: the parts follow one another within each round trip
        parts = dataclasses.astuple(hop.times)
        assert min(parts) > 0, hop
        assert hop.compute_s + sum(parts) <= hop.total_s, hop


async def test_seeded_sampling_over_the_network_equals_local(swarm):
    await swarm.add_node("a", 0, 3)
    await swarm.add_node("b", 3, 6)
    client = await swarm.client("user")
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=11)
    report = await client.generate_text(prompt_ids=PROMPT, params=params)
    assert report.token_ids == local_tokens(swarm.model_dir, 8, temperature=1.0, top_p=0.9, seed=11)


async def test_fp16_codec_stays_within_tolerance(swarm):
    await swarm.add_node("a", 0, 3)
    await swarm.add_node("b", 3, 6)
    client = await swarm.client("user", codec=Codec.FP16)
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=8))
    expected = local_tokens(swarm.model_dir, 8)
    assert sum(a == b for a, b in zip(report.token_ids, expected)) >= 7


async def test_overlapping_spans_and_concurrent_clients(swarm):
    await swarm.add_node("long", 0, 4)
    await swarm.add_node("tail", 3, 6)
    clients = [await swarm.client(f"user{i}") for i in range(4)]
    prompts = [PROMPT, PROMPT[:3], PROMPT[2:], [8, 8, 8]]
    results = {}

    async def run(i):
        results[i] = (await clients[i].generate_text(prompt_ids=prompts[i], params=SamplingParams(max_new_tokens=6))).token_ids

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(run, i)
    for i, prompt in enumerate(prompts):
        expected = generate_local(LocalPipeline.load(swarm.model_dir), prompt, SamplingParams(max_new_tokens=6))
        assert results[i] == expected.token_ids


async def test_missing_blocks_are_named(swarm):
    await swarm.add_node("a", 0, 2)
    client = await swarm.client("user", request_timeout_s=1.0)
    started = trio.current_time()
    with pytest.raises(NoRouteError) as err:
        await client.generate_text(prompt_ids=PROMPT)
    assert err.value.missing == [(2, 6)]
    assert trio.current_time() - started < 1.5  # waited for coverage up to the deadline, not longer


async def test_sessions_are_freed_after_generation(swarm):
    node = await swarm.add_node("a", 0, 6, kv_cache_bytes=1 << 20)
    client = await swarm.client("user")
    for _ in range(3):
        await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=4))
        with trio.fail_after(1):
            while node.manager.sessions:
                await trio.sleep(0.01)
    assert node.manager.reserved_bytes == 0


async def test_a_large_swarm_probes_only_the_route_and_a_sample(swarm, monkeypatch):
    """Past `probe_all_up_to` records the client probes the planned route's peers and a few others, not everyone."""
    for i in range(4):
        await swarm.add_node(f"half{i}", 3 * (i % 2), 3 * (i % 2) + 3)
    await swarm.add_node("whole", 0, 6)
    probed: list[str] = []
    probe = Client._probe

    async def counting(self, record):
        probed.append(record.peer_id)
        return await probe(self, record)

    monkeypatch.setattr(Client, "_probe", counting)
    client = await swarm.client("user", probe_all_up_to=2, probe_sample=1)
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=5))
    assert report.token_ids == local_tokens(swarm.model_dir, 5)
    assert len(probed) <= len(report.hops) + 1 < 5


async def test_records_that_promise_more_than_probes_show_do_not_make_planning_chase_every_peer(swarm, monkeypatch):
    """Every record says its node is 100x faster than its probe then shows (stale load): unprobed peers
    always look best, yet planning stops after `probe_rounds` rounds with a route over peers that answered."""
    for i in range(12):
        await swarm.add_node(f"n{i:02d}", 0, 6, token_seconds=0.05)  # compute outweighs any round trip here
    lookup = MemoryDirectory.lookup

    async def promising(self, model_key):
        return [dataclasses.replace(r, info=dataclasses.replace(r.info, throughput=r.info.throughput * 100))
                for r in await lookup(self, model_key)]

    monkeypatch.setattr(MemoryDirectory, "lookup", promising)
    rounds: list[list[str]] = []
    probe_all = Client._probe_all

    async def counting(self, records):
        rounds.append([r.peer_id for r in records])
        return await probe_all(self, records)

    monkeypatch.setattr(Client, "_probe_all", counting)
    client = await swarm.client("user", probe_all_up_to=2, probe_sample=1, probe_rounds=3)
    route = await client.plan()
    assert len(rounds) == 3
    assert route.peers[0] in {peer for batch in rounds for peer in batch}
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=5))
    assert report.token_ids == local_tokens(swarm.model_dir, 5)


async def test_a_stale_record_on_the_planned_route_is_routed_around(swarm):
    """The cheapest announced peer is gone (its record not yet expired): planning probes it and goes elsewhere."""
    await swarm.add_node("fast", 0, 6, token_seconds=1e-5)
    for name, (start, end) in {"a": (0, 3), "b": (3, 6), "c": (0, 3), "d": (3, 6)}.items():
        await swarm.add_node(name, start, end)
    client = await swarm.client("user", probe_all_up_to=2, probe_sample=0)
    assert (await client.plan()).peers == ["fast"]
    swarm.network.crash("fast")
    route = await client.plan()
    assert "fast" not in route.peers and [(h.start, h.end) for h in route.hops] == [(0, 3), (3, 6)]
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=5))
    assert report.token_ids == local_tokens(swarm.model_dir, 5) and "fast" not in [h.peer_id for h in report.hops]


class AnnouncesItsWildcard(MemoryTransport):
    """The LAN bug: a node announcing the address it listens on (0.0.0.0), not its host's addresses."""

    @property
    def addrs(self) -> list[str]:
        return [memory_addr(WILDCARD, self.network.attachment(self.peer_id).host, self.peer_id)]


@pytest.mark.parametrize("announces", ["wildcard", "loopback-only", "another-lan"])
async def test_a_node_the_client_cannot_reach_is_not_used(swarm, autojump_clock, announces):
    """b's record covers blocks [3, 6), but no address in it leads to b from the client's host: the
    client fails naming those blocks, and uses c once c serves them, though b is faster."""
    fast = dict(token_seconds=1e-5, compute_in_thread=False)
    await swarm.add_node("a", 0, 3, compute_in_thread=False)
    if announces == "wildcard":
        await swarm.add_node("b", 3, 6, transport_class=AnnouncesItsWildcard, **fast)
    elif announces == "loopback-only":
        await swarm.add_node("b", 3, 6, listen=(LOOPBACK,), **fast)
    else:
        swarm.network.attach("b", ["another-lan"])
        await swarm.add_node("b", 3, 6, **fast)
    client = await swarm.client("user", request_timeout_s=5.0)
    with pytest.raises(NoRouteError) as err:
        await client.generate_text(prompt_ids=PROMPT)
    assert err.value.missing == [(3, 6)]
    await swarm.add_node("c", 3, 6, compute_in_thread=False)
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=5))
    assert report.token_ids == local_tokens(swarm.model_dir, 5)
    assert [hop["peer_id"] for hop in report.route] == ["a", "c"]


async def test_a_host_on_two_lans_serves_a_client_on_one_of_them(swarm, autojump_clock):
    """The bridge announces an address on each LAN; the client, on LAN b only, reaches it through the
    second, and cannot use the faster node on LAN a."""
    for peer, segments in (("lan-a-node", ["lan-a"]), ("bridge", ["lan-a", "lan-b"]), ("user", ["lan-b"])):
        swarm.network.attach(peer, segments)
    await swarm.add_node("lan-a-node", 0, 6, token_seconds=1e-5, compute_in_thread=False)
    await swarm.add_node("bridge", 0, 6, compute_in_thread=False)
    client = await swarm.client("user")
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=5))
    assert report.token_ids == local_tokens(swarm.model_dir, 5)
    assert [hop["peer_id"] for hop in report.route] == ["bridge"]


def stream_kinds(client: Client, monkeypatch) -> list[str]:
    """Records the byte stream each hop steps over."""
    from mesh.session import HopSession

    kinds, step = [], HopSession.step

    async def spying(self, *args, **kwargs):
        kinds.append(type(self.stream.raw).__name__)
        return await step(self, *args, **kwargs)

    monkeypatch.setattr(HopSession, "step", spying)
    return kinds


async def test_steps_take_the_nodes_data_channels_and_give_the_same_tokens(swarm, monkeypatch):
    nodes = [await swarm.add_node(name, start, end, data_channels=DataChannels("127.0.0.1"))
             for name, start, end in (("a", 0, 3), ("b", 3, 6))]
    client = await swarm.client("user")
    kinds = stream_kinds(client, monkeypatch)
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=6))
    assert report.token_ids == local_tokens(swarm.model_dir, 6)
    assert set(kinds) == {SealedStream.__name__}
    with trio.fail_after(5):  # sessions end and their channels close
        while any(node.manager.sessions for node in nodes):
            await trio.sleep(0.01)


@pytest.mark.parametrize("why", ["unreachable", "client-declines"])
async def test_without_a_reachable_data_channel_steps_stay_on_the_transport(swarm, monkeypatch, why):
    channels = DataChannels("127.0.0.1")
    if why == "unreachable":
        channels.advertise_host = "127.0.0.1"
        monkeypatch.setattr(DataChannels, "address_for", lambda self, reached_on: "127.0.0.1:9")  # nothing listens there
    await swarm.add_node("a", 0, 6, data_channels=channels)
    client = await swarm.client("user", data_channel=why != "client-declines")
    kinds = stream_kinds(client, monkeypatch)
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=6))
    assert report.token_ids == local_tokens(swarm.model_dir, 6)
    assert set(kinds) == {"MemoryByteStream"}
