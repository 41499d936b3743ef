"""The client across NATs on the in-memory transport, in virtual time: direct hops preferred over
relayed ones, a peer behind a cone NAT hole-punched before the session opens, and a relayed hop
whose relay crashes mid-answer replayed through the node's other relay (no ban, same tokens)."""

from __future__ import annotations

import pytest
import trio

from mesh.client import Client, ClientOptions
from mesh.discovery import MemoryDirectory
from mesh.memory_nat import NatType
from mesh.memory_transport import Link, MemoryTransport
from mesh.transport import RelayLimits
from node.node import Node
from node.sessions import SessionLimits
from protocol import Codec
from shard.generate import generate_local
from shard.manifest import model_digest
from shard.pipeline import LocalPipeline
from shard.sampling import SamplingParams
from shard.span import load_span
from tests.mesh.test_memory_nat import public_addr, world

PROMPT = [5, 17, 33, 2, 9, 71, 4]
TOKENS = 12


@pytest.fixture(scope="module")
def expected(checkpoint_factory):
    return generate_local(LocalPipeline.load(checkpoint_factory("llama")), PROMPT,
                          SamplingParams(max_new_tokens=TOKENS)).token_ids


class NatSwarm:
    """Relays r1, r2 (public); nodes serving the whole model (6 blocks) behind the routers `world`
    gives them, each holding a slot on both relays; a client behind its own router."""

    def __init__(self, model_dir, nursery: trio.Nursery, **nats: NatType):
        self.model_dir, self.nursery = model_dir, nursery
        self.network = world(r1=NatType.NONE, r2=NatType.NONE, **nats)
        self.network.default_link = Link(latency_s=0.005)  # a household link: through a relay, two of them
        self.directory = MemoryDirectory(trio.current_time)
        self.transports: dict[str, MemoryTransport] = {}
        self.nodes: dict[str, Node] = {}

    async def start(self, *nodes: str) -> None:
        for relay in ("r1", "r2"):
            (await self._open(relay)).offer_relay(RelayLimits())
        span = load_span(self.model_dir, 0, 6)
        for name in nodes:
            transport = await self._open(name)
            for relay in ("r1", "r2"):
                await transport.dial(public_addr(self.transports[relay]), timeout=5)
                await transport.reserve(relay, timeout=5)
            node = Node(span, "tiny", model_digest(self.model_dir), wall_clock=trio.current_time, token_seconds=0.001,
                        limits=SessionLimits(compute_in_thread=False))
            await self.nursery.start(node.run, transport, self.directory)
            self.nodes[name] = node

    async def client(self) -> Client:
        transport = await self._open("client")
        return Client(transport, self.directory, self.model_dir, options=ClientOptions(codec=Codec.FP32))

    async def _open(self, name: str) -> MemoryTransport:
        self.transports[name] = await self.nursery.start(self._transport, name)
        return self.transports[name]

    async def _transport(self, name: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with MemoryTransport.open(self.network, name) as transport:
            task_status.started(transport)
            await trio.sleep_forever()


@pytest.fixture
async def nursery():
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()


async def test_a_direct_hop_is_preferred_to_a_relayed_one(autojump_clock, checkpoint_factory, nursery, expected):
    swarm = NatSwarm(checkpoint_factory("llama"), nursery, home=NatType.SYMMETRIC, public=NatType.NONE,
                     client=NatType.SYMMETRIC)
    await swarm.start("home", "public")
    client = await swarm.client()
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    assert report.token_ids == expected
    assert [(hop.peer_id, hop.path) for hop in report.hops] == [("public", "direct")]


async def test_a_peer_behind_a_cone_nat_is_punched_before_its_session_opens(autojump_clock, checkpoint_factory,
                                                                            nursery, expected):
    swarm = NatSwarm(checkpoint_factory("llama"), nursery, home=NatType.PORT_RESTRICTED,
                     client=NatType.PORT_RESTRICTED)
    await swarm.start("home")
    client = await swarm.client()
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    assert report.token_ids == expected
    assert [(hop.peer_id, hop.path) for hop in report.hops] == [("home", "hole-punched")]


async def test_a_relay_crashing_mid_answer_is_replaced_by_the_nodes_other_relay(autojump_clock, checkpoint_factory,
                                                                                nursery, expected):
    swarm = NatSwarm(checkpoint_factory("llama"), nursery, home=NatType.SYMMETRIC, client=NatType.SYMMETRIC)
    await swarm.start("home")
    manager, network, calls, recovery_relay = swarm.nodes["home"].manager, swarm.network, [0], []
    original = manager.step

    async def crash_its_relay_at_the_fifth_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:
            used = [relay for relay in ("r1", "r2") if network.relays.circuits_via(relay)]
            network.crash(used[0])
            recovery_relay.append(used[0])
        return await original(*args, **kwargs)

    manager.step = crash_its_relay_at_the_fifth_step
    client = await swarm.client()
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    assert report.token_ids == expected
    [recovery] = report.recoveries
    assert (recovery.failed_peer, recovery.replacements) == ("home", ["home"])  # not banned: the relay failed
    assert [(hop.peer_id, hop.path) for hop in report.hops] == [("home", "relayed")]
    assert report.hops[0].relay in ("r1", "r2") and report.hops[0].relay != recovery_relay[0]
