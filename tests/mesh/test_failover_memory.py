"""Failover on the in-memory transport in virtual time: every kind of failure, identical output."""

from __future__ import annotations

import pytest
import trio

from mesh.client import Client, ClientOptions
from mesh.discovery import MemoryDirectory
from mesh.memory_transport import MemoryNetwork, MemoryTransport
from mesh.pipeline import GenerationFailed
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
TOKENS = 16


class FaultySwarm:
    """In-memory nodes whose n-th step can crash or freeze them, in trio's virtual time."""

    def __init__(self, model_dir, nursery: trio.Nursery, quant: str = "none"):
        self.model_dir, self.nursery, self.quant = model_dir, nursery, quant
        self.network = MemoryNetwork()
        self.directory = MemoryDirectory(trio.current_time)
        self.digest = model_digest(model_dir)
        self.nodes: dict[str, Node] = {}
        self.spans = {}

    async def add_node(self, name: str, start: int, end: int, token_seconds: float = 0.001, **limits) -> Node:
        """A node serving [start, end) as peer `name`; `limits` override its `SessionLimits`."""
        transport = await self.nursery.start(self._transport, name)
        if (start, end) not in self.spans:
            self.spans[(start, end)] = load_span(self.model_dir, start, end, quant=self.quant)
        node = Node(self.spans[(start, end)], "tiny", self.digest, wall_clock=trio.current_time,
                    token_seconds=token_seconds, limits=SessionLimits(compute_in_thread=False, **limits))
        await self.nursery.start(node.run, transport, self.directory)
        self.nodes[name] = node
        return node

    def fail_at(self, name: str, step: int, how: str) -> None:
        """Make node `name` fail when it is asked to compute its `step`-th step (counting from 0)."""
        manager, network, node = self.nodes[name].manager, self.network, self.nodes[name]
        original, calls = manager.step, [0]

        async def failing_step(session, hidden, position, *rest, **kwargs):
            calls[0] += 1
            if calls[0] - 1 == step:
                if how == "crash":
                    network.crash(name)
                elif how == "freeze":
                    network.freeze(name)
                elif how == "drain":  # as on SIGTERM, but at a known point: this step is refused
                    node.server.drain()
                    node.stop()
                elif how == "drain-after-compute":  # SIGTERM while the step is in flight: it is answered
                    result = await original(session, hidden, position, *rest, **kwargs)
                    node.server.drain()
                    node.stop()
                    return result
            return await original(session, hidden, position, *rest, **kwargs)

        manager.step = failing_step

    async def _transport(self, name: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with MemoryTransport.open(self.network, name) as transport:
            task_status.started(transport)
            await trio.sleep_forever()

    async def client(self, **options) -> Client:
        transport = await self.nursery.start(self._transport, "user")
        return Client(transport, self.directory, self.model_dir,
                      options=ClientOptions(codec=Codec.FP32, **options))


@pytest.fixture
async def swarm(checkpoint_factory):  # tests request autojump_clock themselves: pytest-trio only sees a test's own clock
    async with trio.open_nursery() as nursery:
        yield FaultySwarm(checkpoint_factory("llama"), nursery)
        nursery.cancel_scope.cancel()


@pytest.fixture(scope="module")
def expected(checkpoint_factory):
    return generate_local(LocalPipeline.load(checkpoint_factory("llama")), PROMPT,
                          SamplingParams(max_new_tokens=TOKENS)).token_ids


async def two_routes(swarm) -> None:
    """a, b on the preferred route; c, d (slower) as spares for the same blocks."""
    await swarm.add_node("a", 0, 3)
    await swarm.add_node("b", 3, 6)
    await swarm.add_node("c", 0, 3, token_seconds=0.01)
    await swarm.add_node("d", 3, 6, token_seconds=0.01)


@pytest.mark.parametrize("how", ["crash", "freeze", "drain"])
@pytest.mark.parametrize("step", [0, 1, 9], ids=["prefill", "first-decode", "late"])
async def test_failure_of_a_hop_gives_identical_output(autojump_clock, swarm, expected, how, step):
    await two_routes(swarm)
    swarm.fail_at("b", step, how)
    client = await swarm.client()
    started = trio.current_time()
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    assert report.token_ids == expected
    [recovery] = report.recoveries
    assert (recovery.failed_peer, recovery.replacements) == ("b", ["d"])
    # the failed step is not in the history: it is sent on to the replacement after the replay
    assert recovery.tokens_replayed == (len(PROMPT) + step - 1 if step else 0)
    if how == "freeze":  # noticed by the step timeout, not faster
        assert trio.current_time() - started >= ClientOptions().step_timeout_s
    assert [hop["peer_id"] for hop in report.route] == ["a", "d"]


@pytest.mark.parametrize("step", [1, 9])
async def test_a_drain_during_a_step_answers_it_and_refuses_the_next(autojump_clock, swarm, expected, step):
    await two_routes(swarm)
    swarm.fail_at("b", step, "drain-after-compute")
    client = await swarm.client()
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    assert report.token_ids == expected
    [recovery] = report.recoveries
    assert (recovery.failed_peer, recovery.replacements) == ("b", ["d"])
    assert recovery.tokens_replayed == len(PROMPT) + step  # the drained step's answer arrived: replayed too


async def test_replacement_failing_during_replay_is_replaced_too(autojump_clock, swarm, expected):
    await two_routes(swarm)
    await swarm.add_node("e", 3, 6, token_seconds=0.1)
    swarm.fail_at("b", 5, "crash")
    swarm.fail_at("d", 0, "crash")  # d dies on its first step: the replay of b's history
    client = await swarm.client()
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    assert report.token_ids == expected
    assert [r.failed_peer for r in report.recoveries] == ["b"]
    assert report.recoveries[0].replacements == ["e"]


async def test_replay_onto_a_split_with_other_span_boundaries(autojump_clock, swarm, expected):
    await swarm.add_node("left", 0, 2)
    await swarm.add_node("whole", 2, 6)
    await swarm.add_node("p", 2, 3, token_seconds=0.01)
    await swarm.add_node("q", 3, 5, token_seconds=0.01)
    await swarm.add_node("r", 4, 6, token_seconds=0.01)
    swarm.fail_at("whole", 6, "crash")
    client = await swarm.client()
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    assert report.token_ids == expected
    assert report.recoveries[0].replacements == ["p", "q", "r"]
    bounds = [(h["start"], h["end"]) for h in report.route]
    assert bounds[0] == (0, 2) and bounds[1] == (2, 3) and bounds[-1][1] == 6
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


async def test_second_failure_later_replays_the_replacements_history(autojump_clock, swarm, expected):
    await two_routes(swarm)
    await swarm.add_node("e", 3, 6, token_seconds=0.1)
    swarm.fail_at("b", 3, "crash")
    swarm.fail_at("d", 8, "crash")  # d took over at step 3; its history includes the replayed steps
    client = await swarm.client()
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    assert report.token_ids == expected
    assert [r.failed_peer for r in report.recoveries] == ["b", "d"]


async def test_seeded_sampling_survives_failover(autojump_clock, swarm, checkpoint_factory):
    await two_routes(swarm)
    swarm.fail_at("a", 4, "crash")
    params = SamplingParams(max_new_tokens=TOKENS, temperature=1.0, top_k=20, seed=5)
    client = await swarm.client()
    report = await client.generate_text(prompt_ids=PROMPT, params=params)
    local = generate_local(LocalPipeline.load(checkpoint_factory("llama")), PROMPT, params)
    assert report.token_ids == local.token_ids and len(report.recoveries) == 1


async def test_no_replacement_fails_within_the_deadline_naming_the_blocks(autojump_clock, swarm):
    await swarm.add_node("a", 0, 3)
    await swarm.add_node("b", 3, 6)
    swarm.fail_at("b", 2, "crash")
    client = await swarm.client(request_timeout_s=20.0)
    started = trio.current_time()
    with pytest.raises(NoRouteError) as err:
        await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    assert err.value.missing == [(3, 6)]
    assert trio.current_time() - started <= 20.0


async def test_a_replacement_that_arrives_later_is_used(autojump_clock, swarm, expected):
    await swarm.add_node("a", 0, 3)
    await swarm.add_node("b", 3, 6)
    swarm.fail_at("b", 2, "crash")

    async def late_joiner():
        await trio.sleep(3.0)
        await swarm.add_node("late", 3, 6)

    swarm.nursery.start_soon(late_joiner)
    client = await swarm.client(request_timeout_s=60.0)
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    assert report.token_ids == expected
    assert report.recoveries[0].replacements == ["late"] and report.recoveries[0].seconds >= 2.5


async def test_a_failed_peer_is_not_retried_while_banned(autojump_clock, swarm, expected):
    await two_routes(swarm)
    swarm.fail_at("b", 1, "freeze")
    client = await swarm.client()
    first = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    second = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    assert first.token_ids == second.token_ids == expected
    assert "b" not in [hop["peer_id"] for hop in second.route] and not second.recoveries


async def test_request_deadline_bounds_a_stuck_generation(autojump_clock, swarm):
    await swarm.add_node("a", 0, 6)
    swarm.fail_at("a", 1, "freeze")
    client = await swarm.client(request_timeout_s=15.0)
    started = trio.current_time()
    with pytest.raises((GenerationFailed, NoRouteError)):
        await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    assert trio.current_time() - started <= 15.0 + 1e-6


async def test_replay_is_one_message_per_hop_and_still_exact(autojump_clock, swarm, expected, monkeypatch):
    from mesh.session import HopSession

    await two_routes(swarm)
    swarm.fail_at("b", 12, "crash")
    sent = []
    original = HopSession.step

    async def counting(self, hidden, position, **kwargs):
        if kwargs.get("replay"):
            sent.append((self.peer_id, hidden.shape[1], kwargs.get("chunks")))
        return await original(self, hidden, position, **kwargs)

    monkeypatch.setattr(HopSession, "step", counting)
    client = await swarm.client()
    report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    assert report.token_ids == expected
    assert sent == [("d", len(PROMPT) + 11, (len(PROMPT),) + (1,) * 11)]


async def test_concurrent_generations_share_an_int8_head_pass_with_the_tokens_of_running_alone(autojump_clock, swarm):
    await swarm.add_node("a", 0, 3)
    await swarm.add_node("b", 3, 6)
    client = await swarm.client(head_quant="int8")
    prompts = [PROMPT, [8, 8, 8], [100, 3], [40, 41, 42, 43, 44]]
    alone = [(await client.generate_text(prompt_ids=p, params=SamplingParams(max_new_tokens=TOKENS))).token_ids
             for p in prompts]
    rows, logits = [], client.head.logits

    def counting(hidden):
        rows.append(hidden.shape[0])
        return logits(hidden)

    client.head.logits = counting
    together = [None] * len(prompts)

    async def one(i):
        together[i] = (await client.generate_text(prompt_ids=prompts[i], params=SamplingParams(max_new_tokens=TOKENS))).token_ids

    async with trio.open_nursery() as nursery:
        for i in range(len(prompts)):
            nursery.start_soon(one, i)
    assert together == alone  # the int8 head computes rows independently
    assert sum(rows) == len(prompts) * TOKENS and max(rows) > 1  # and shared passes
