"""Hostile hosts (issue 18): attackers modelled as actors, aimed at the real node and client code.

A scenario's `[hostile]` section adds `fraction` of the swarm as hostile hosts, present from the
start to the end, each doing every behaviour listed:

- "stall": a real `Node` serving the first (or last) blocks, which every route needs, that
  announces (through its own, sealed, record: allowed) `lie` x its real throughput, so clients
  plan routes through it, and stalls every session: its transport lets through a few frames
  after the node's Hello (`stall_frames`, drawn per stream: 0 stalls the open, 1 the first step,
  ...), then writes nothing more, or half of the next frame and then nothing (`half_frame`).
  Only the client's timeouts notice; it must fail over and replay.
- "forge": every `forge_every`, a record under an honest peer's id (a withdrawal, a record
  without addresses that would hide it, a lure with the attacker's addresses and 1,000 x the
  throughput) or its own record pinned for an hour. Each host announces through a directory
  bound to its own peer id (`mesh.discovery.SealedView`, as only a peer's key seals a record the
  DHT accepts), so each is refused with `InvalidRecord`; refusals are counted, and an accepted
  forgery would be too.
- "hoard": `simulations.hoarding.Hoarder`, slot hoarding and prefill rewinds on honest nodes.
- "corrupt": a real `Node` whose session manager adds noise of relative size `corrupt` to its
  outputs (`node.chaos.Chaos`, on each step with probability `corrupt_probability`): a lie the
  client's spot checks (`[clients] verify_rate`) must catch, as the stand-in tokens go wrong
  otherwise (an invariant). Without "stall" it serves the span of a random honest household host,
  so that it is one replica among others there and announces its true throughput x `lie`.

What the victims did is measured on their side: client recoveries whose failed peer is hostile
(the report's `hostile.failovers_from_hostile`), sessions completed or hung. Every draw comes
from a generator seeded by the seed and the host (`hostile:x3`), and nothing here runs when the
fraction is 0, so a run without hostile hosts is the scenario's plain run, draw for draw.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter

import trio

from mesh.discovery import RECORD_TTL_S, Discovery, InvalidRecord, PeerRecord
from mesh.memory_transport import MemoryTransport
from mesh.transport import ByteStream, StreamHandler, Transport
from node.chaos import Chaos, ChaosSpec
from node.node import Node
from node.sessions import SessionLimits
from protocol import INFERENCE_PROTOCOL
from simulations import churn
from simulations.compute import step_seconds
from simulations.hoarding import Hoarder
from simulations.hosts import Host, HostDirectory
from simulations.scenario import hostile_hosts

FORGERIES = ("withdraw", "hide", "lure", "pin")
LURE_FACTOR = 1000.0  # a lure under an honest peer's id announces this many times its throughput
PIN_S = 3600.0  # a pinned record's lifetime


class StallingStream(ByteStream):
    """A node's side of one inference stream that lets `frames` writes through after the Hello, then
    stalls: writes nothing more (or half of the next write first) and never returns."""

    def __init__(self, raw: ByteStream, frames: int, half: bool, on_stall):
        self.raw, self.peer_id = raw, raw.peer_id
        self.local_host, self.remote_host = raw.local_host, raw.remote_host
        self.half, self.on_stall = half, on_stall
        self.writes_left = frames + 1  # the node writes its Hello first (one write per frame)

    async def send_all(self, data: bytes) -> None:
        if self.writes_left > 0:
            self.writes_left -= 1
            return await self.raw.send_all(data)
        if self.writes_left == 0:  # the first write held back: the stall begins
            self.writes_left = -1
            self.on_stall(self)
            if self.half and len(data) > 1:
                await self.raw.send_all(data[:len(data) // 2])
        await trio.sleep_forever()  # until the node's own I/O timeout gives up on the stream

    async def receive_some(self, max_bytes: int) -> bytes:
        return await self.raw.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.raw.aclose()


class StallingTransport(Transport):
    """A host's transport whose incoming inference streams stall (`StallingStream`, one plan per stream)."""

    def __init__(self, inner: Transport, plan, on_stall):
        self.inner, self.plan, self.on_stall = inner, plan, on_stall
        self.peer_id = inner.peer_id

    @property
    def addrs(self) -> list[str]:
        return self.inner.addrs

    async def dial(self, addr: str, *, timeout: float) -> str:
        return await self.inner.dial(addr, timeout=timeout)

    async def open_stream(self, peer_id: str, protocol_id: str, *, timeout: float) -> ByteStream:
        return await self.inner.open_stream(peer_id, protocol_id, timeout=timeout)

    def set_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        async def stalling(stream: ByteStream) -> None:
            frames, half = self.plan()
            await handler(StallingStream(stream, frames, half, self.on_stall))

        self.inner.set_handler(protocol_id, stalling if protocol_id == INFERENCE_PROTOCOL else handler)

    def add_peer_addrs(self, peer_id: str, addrs: list[str]) -> None:
        self.inner.add_peer_addrs(peer_id, addrs)


class HostileSwarm:
    """The run's hostile hosts (`x0`, `x1`, ...) and what they did."""

    def __init__(self, world):
        self.world, self.spec = world, world.scenario.hostile
        self.count = hostile_hosts(world.scenario)
        self.ids = frozenset(f"x{index}" for index in range(self.count))
        self.counts: Counter[str] = Counter()
        self.hosts: list[Host] = []
        self.chaos: list[Chaos] = []  # the lying nodes' (counts of steps corrupted)

    async def start(self, nursery: trio.Nursery) -> None:
        """Every hostile host, serving (if it stalls) once this returns; they stay to the end."""
        scenario, rng = self.world.scenario, self.world.rng("hostile")
        device = scenario.device(self.spec.device)
        for index in range(self.count):
            peer_id = f"x{index}"
            region = churn.weighted_choice(rng, scenario.regions)
            host = Host(peer_id, region, device, "hostile", (0, 1), self.world.rng(f"hostile:{peer_id}"))
            host.span = self._span(index, device, rng)
            self.world.network.place(peer_id, region, device)
            self.hosts.append(host)
            await nursery.start(self._life, host)

    async def _life(self, host: Host, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        behaviours = set(self.spec.behaviours)
        async with MemoryTransport.open(self.world.network, host.peer_id) as transport:
            directory = HostDirectory(self.world.directory, host, self.world.swarm)
            host.state = "up"
            async with trio.open_nursery() as nursery:
                if behaviours & {"stall", "corrupt"}:
                    await nursery.start(self._serve, host, transport, directory)
                task_status.started()
                if "forge" in behaviours:
                    nursery.start_soon(self._forge, host, transport, directory)
                if "hoard" in behaviours:
                    nursery.start_soon(Hoarder(self.world, host, transport, self.ids, self.counts).run)

    def _span(self, index: int, device, rng) -> tuple[int, int]:
        """A stalling host's: the first or the last blocks, which every route needs; a lying one's
        (that does not stall): a random honest household host's, where others can check it."""
        blocks = self.world.model.blocks
        honest = [h.span for h in self.world.swarm.live() if h.kind == "household"]
        if "stall" not in self.spec.behaviours and honest:
            return rng.choice(honest)
        length = min(blocks, self.world.model.span_length(device))
        return (0, length) if index % 2 == 0 else (blocks - length, blocks)

    async def _serve(self, host: Host, transport: Transport, directory: Discovery, *,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
        """A real node, announcing `lie` x its throughput: on a stalling transport ("stall"), with
        noisy outputs ("corrupt")."""
        model, device, spec = self.world.model, host.device, self.spec
        start, end = host.span
        limits = SessionLimits(max_sessions=device.max_sessions, kv_cache_bytes=int(device.kv_gb * 1e9),
                               max_length=model.config.max_position_embeddings, compute_in_thread=False)
        lying = step_seconds(device, end - start, 1) / spec.lie
        chaos = None
        if "corrupt" in spec.behaviours:
            chaos = Chaos(ChaosSpec("corrupt-sometimes", relative=spec.corrupt, probability=spec.corrupt_probability,
                                    seed=host.rng.randrange(2**32)))
            self.chaos.append(chaos)
        host.node = Node(model.span(device, start, end), model.model_id, model.digest, limits=limits,
                         wall_clock=trio.current_time, token_seconds=lying, chaos=chaos)
        self.world.trace.record("hostile_up", peer=host.peer_id, region=host.region, blocks=[start, end])
        if "stall" not in spec.behaviours:
            return await host.node.run(transport, directory, task_status=task_status)
        low, high = self.spec.stall_frames

        def plan() -> tuple[int, bool]:
            return host.rng.randint(low, high), host.rng.random() < self.spec.half_frame

        def stalled(stream: StallingStream) -> None:
            self.counts["stalls"] += 1
            self.counts["stalls_half_frame"] += stream.half
            self.world.trace.record("hostile_stall", peer=host.peer_id, victim=stream.peer_id, half=stream.half)

        await host.node.run(StallingTransport(transport, plan, stalled), directory, task_status=task_status)

    async def _forge(self, host: Host, transport: Transport, directory: Discovery) -> None:
        """A forgery every `forge_every` (+-50 %), the kinds in turn, against a random honest peer."""
        digest = self.world.model.digest
        for attempt in itertools.count():
            await trio.sleep(self.spec.forge_every_s * (0.5 + host.rng.random()))
            honest = [r for r in await directory.lookup(digest) if r.peer_id not in self.ids]
            if not honest:
                continue
            victim, kind = host.rng.choice(honest), FORGERIES[attempt % len(FORGERIES)]
            now = trio.current_time()
            try:
                if kind == "withdraw":
                    await directory.withdraw(victim.peer_id, digest)
                elif kind == "hide":  # a record without addresses, later than the victim's: a withdrawal
                    await directory.announce(PeerRecord(victim.peer_id, (), victim.info, victim.expires_at + 15.0))
                elif kind == "lure":
                    info = dataclasses.replace(victim.info, throughput=victim.info.throughput * LURE_FACTOR)
                    await directory.announce(PeerRecord(victim.peer_id, tuple(transport.addrs), info,
                                                        now + RECORD_TTL_S))
                else:  # its own record (or one claiming the victim's span), for an hour
                    info = host.node.span_info() if host.node is not None else victim.info
                    await directory.announce(PeerRecord(host.peer_id, tuple(transport.addrs), info, now + PIN_S))
            except InvalidRecord:
                self.counts["forgeries_refused"] += 1
                self.world.trace.record("forgery_refused", peer=host.peer_id, forged=kind, victim=victim.peer_id)
            else:
                self.counts["forgeries_accepted"] += 1
                self.world.trace.record("forgery_accepted", peer=host.peer_id, forged=kind, victim=victim.peer_id)

    def summary(self, sessions) -> dict:
        """What the hostile hosts did, and what it did to the honest clients (`sessions`)."""
        failovers = [r for s in sessions for r in s.recoveries if r["failed_peer"] in self.ids]
        return {"fraction": self.spec.fraction, "hosts": self.count, "behaviours": list(self.spec.behaviours),
                "counts": dict(sorted(self.counts.items())),
                "failovers_from_hostile": len(failovers),
                "sessions_failed_over_from_hostile": sum(
                    1 for s in sessions if any(r["failed_peer"] in self.ids for r in s.recoveries)),
                "completed_through_hostile": sum(1 for s in sessions
                                                 if s.outcome == "completed" and set(s.peers) & self.ids),
                "ids": sorted(self.ids), "steps_corrupted": sum(c.steps_corrupted for c in self.chaos)}
