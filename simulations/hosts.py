"""Hosts: real `node.Node`s on the virtual network, arriving, serving and leaving as churn says.

A household host arrives (Poisson, following the day), picks its span as the scenario's balance
policy says (by default where the swarm is weakest, from what discovery says is served, with the
real `mesh.balance`; "balanced" also rebalances with the real `node.rebalance`), runs a real `Node`
over its own `MemoryTransport`, and after
a Weibull session ends it one way or another: drained on shutdown, crashed (streams reset,
record left to expire), or frozen (silent; then it thaws or dies). A crashed host may restart
with its identity and span. Data-center ("cloud") hosts serve the whole model until an outage.
A frozen or clogged host's announcements do not get out (`HostDirectory`), as on a real network;
and a host can announce only its own records, as only a peer's key seals a record that verifies.
With `[nat]`, a household host may sit behind a router and serves beside a real ReachKeeper
(`simulations.nat`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import trio

from mesh.balance import choose_span
from mesh.discovery import Discovery, PeerRecord, SealedView
from mesh.memory_nat import NatType
from mesh.memory_transport import MemoryTransport
from node.node import Node
from node.rebalance import BalanceSettings, served_from
from node.sessions import SessionLimits
from simulations import churn
from simulations.compute import step_seconds
from simulations.fetch import FetchFailed
from simulations.scenario import DeviceProfile


@dataclass
class Host:
    peer_id: str
    region: str
    device: DeviceProfile
    kind: str  # "household", "cloud" or "hostile" (`simulations.hostile`: not in `Swarm.hosts`)
    span: tuple[int, int]
    rng: random.Random
    state: str = "starting"  # starting, up, frozen, down
    node: Node | None = None
    life: trio.CancelScope | None = None
    waiting: trio.CancelScope | None = None  # its current session's wait; cancelled by `depart`
    departing: bool = False


class HostDirectory(Discovery):
    """One host's way to discovery: while it is frozen or clogged, what it says does not get out;
    a record of another peer (or one pinned too far ahead) is refused with `InvalidRecord`, as the
    sealed DHT refuses it (`mesh.discovery.SealedView`)."""

    def __init__(self, directory: Discovery, host: Host, swarm: Swarm):
        self.directory = SealedView(directory, host.peer_id, clock=trio.current_time)
        self.host, self.swarm = host, swarm

    def _heard(self) -> bool:
        return self.host.state != "frozen" and self.host.peer_id not in self.swarm.network.clogged

    async def announce(self, record: PeerRecord) -> None:
        if self._heard():
            await self.directory.announce(record)

    async def withdraw(self, peer_id: str, model_key: str) -> None:
        if self._heard():
            await self.directory.withdraw(peer_id, model_key)

    async def lookup(self, model_key: str) -> list[PeerRecord]:
        return await self.directory.lookup(model_key)


class Swarm:
    def __init__(self, world):
        self.world = world
        self.scenario, self.network, self.model = world.scenario, world.network, world.model
        self.hosts: dict[str, Host] = {}
        self.rng = world.rng("churn")
        self._count = 0

    def live(self) -> list[Host]:
        """Hosts that serve right now: up, and reachable by someone."""
        return [h for h in self.hosts.values() if h.state == "up" and h.peer_id not in self.network.clogged]

    async def start(self, nursery: trio.Nursery) -> None:
        """Cloud hosts, then the initial households (each placed after the ones before it announced)."""
        spec = self.scenario.cloud
        regions = spec.regions or sorted(self.scenario.regions)
        for index in range(spec.nodes):
            device = self.scenario.device(spec.device)
            host = self._new_host(f"dc{index}", regions[index % len(regions)], device, "cloud")
            host.span = (0, min(self.model.blocks, self.model.span_length(device)))
            await nursery.start(self._life, host, float("inf"))
        c = self.scenario.churn
        fetch = self.world.fetch
        if fetch is not None:  # `[fetch]`: the seeds hold the model; the others join with nothing and download
            for host in self.hosts.values():
                fetch.hold_all(host.peer_id, seed=False)  # data-center hosts have the files
            for _ in range(self.scenario.fetch.seeds):
                await self._arrive(nursery, churn.residual_length(self.rng, c.shape, c.median_s), seed=True)
                self.world.note_join()
            nursery.start_soon(self._fresh_joins, nursery, c.nodes - self.scenario.fetch.seeds)
            return
        for _ in range(c.nodes):
            await self._arrive(nursery, churn.residual_length(self.rng, c.shape, c.median_s))
            self.world.note_join()

    async def _fresh_joins(self, nursery: trio.Nursery, count: int) -> None:
        """The initial households of a `[fetch]` run: at random times within `join_over`, none waiting for another."""
        rng, window = self.world.rng("fetch"), self.scenario.fetch.join_over_s
        c = self.scenario.churn
        for at in sorted(rng.uniform(0.0, window) for _ in range(count)):
            await trio.sleep_until(at)
            await self._arrive(nursery, churn.residual_length(self.rng, c.shape, c.median_s))

    async def keep_arriving(self, nursery: trio.Nursery, until: float) -> None:
        """New households, Poisson arrivals following the day, until `until`."""
        c, day = self.scenario.churn, self.scenario.day_night
        rate = churn.arrival_rate(c)
        while True:
            at = churn.next_arrival(trio.current_time(), rate, day, self.rng)
            if at >= until:
                return
            await trio.sleep_until(at)
            await self._arrive(nursery, churn.session_length(self.rng, c.shape, c.median_s))

    async def _arrive(self, nursery: trio.Nursery, session_s: float, *, seed: bool = False) -> None:
        region = churn.weighted_choice(self.rng, self.scenario.regions)
        devices = {name: d.weight for name, d in self.scenario.devices.items()}
        device = self.scenario.devices[churn.weighted_choice(self.rng, devices)]
        if seed and self.scenario.fetch.seed_device:
            device = self.scenario.device(self.scenario.fetch.seed_device)
        self._count += 1
        host = self._new_host(f"n{self._count}", region, device, "household")
        if self.world.fetch is not None and not seed:  # no files: fetch, then serve (not waited for here)
            nursery.start_soon(self._join_fetching, host, session_s)
            return
        if seed:
            self.world.fetch.hold_all(host.peer_id)
        host.span = await self._choose_span(device)
        await nursery.start(self._life, host, session_s)

    async def _join_fetching(self, host: Host, session_s: float) -> None:
        """`hearth node --model-digest`: the manifest from the holders, the span chosen, its pieces
        fetched (`simulations.fetch`), then serve; a failed fetch (no manifest in time) is restarted."""
        fetch = self.world.fetch
        while True:
            try:
                await fetch.manifest(host.peer_id)
            except FetchFailed:
                await trio.sleep(self.scenario.fetch.retry_after_s)
                continue
            host.span = await self._choose_span(host.device)
            await fetch.download(host.peer_id, *host.span)
            break
        await self._life(host, session_s)

    def _new_host(self, peer_id: str, region: str, device: DeviceProfile, kind: str) -> Host:
        host = Host(peer_id, region, device, kind, (0, 1), random.Random(f"{self.world.seed}:host:{peer_id}"))
        self.hosts[peer_id] = host
        nat = self.world.nat.draw(peer_id, "households") if self.world.nat is not None and kind == "household" \
            else NatType.NONE
        self.network.place(peer_id, region, device, nat)
        return host

    async def _choose_span(self, device: DeviceProfile) -> tuple[int, int]:
        length = min(self.model.blocks, self.model.span_length(device))
        if self.scenario.balance.spans == "random":
            start = self.rng.randrange(self.model.blocks - length + 1)
            return start, start + length
        records = await self.world.directory.lookup(self.model.digest)
        return choose_span(served_from(records, self.model.digest), self.model.blocks, length, rng=self.rng)

    def _balancing(self, host: Host) -> tuple[BalanceSettings | None, object]:
        """The host's rebalancing settings and span loader, when the scenario's policy rebalances."""
        b = self.scenario.balance
        if host.kind != "household" or b.spans != "balanced":
            return None, None
        settings = BalanceSettings(self.model.blocks, min(self.model.blocks, self.model.span_length(host.device)),
                                   host.device.block_ms / 1000.0, every_s=b.every_s, threshold=b.threshold,
                                   settle_s=b.settle_s, grace_s=b.grace_s)

        async def load(start: int, end: int):
            self.world.trace.record("node_move", peer=host.peer_id, blocks=[start, end], was=list(host.span))
            if self.world.fetch is not None and host.peer_id in self.world.fetch.hosts:
                await self.world.fetch.download(host.peer_id, start, end, move=True)  # the new blocks' pieces first
            host.span = (start, end)
            if self.world.fetch is not None:
                self.world.fetch.check_held(host)
                self.world.fetch.check_coverage()
            return self.model.span(host.device, start, end)

        return settings, load

    async def _life(self, host: Host, session_s: float, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Sessions of one host until it leaves for good (or is killed); started once it first serves."""
        with trio.CancelScope() as host.life:
            while True:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self._serve, host)
                    task_status.started()
                    task_status = trio.TASK_STATUS_IGNORED
                    ending = await self._session(host, session_s)
                    self._end(host, ending, nursery)
                host.state = "down"
                c = self.scenario.churn
                if ending != "crash" or host.kind != "household" or host.rng.random() >= c.restart:
                    break
                await trio.sleep(c.restart_after_s)
                session_s = churn.session_length(host.rng, c.shape, c.median_s)
        host.state = "down"

    async def _serve(self, host: Host, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with MemoryTransport.open(self.network, host.peer_id) as transport:
            start, end = host.span
            limits = SessionLimits(max_sessions=host.device.max_sessions, kv_cache_bytes=int(host.device.kv_gb * 1e9),
                                   max_length=self.model.config.max_position_embeddings, compute_in_thread=False)
            balance, load = self._balancing(host)
            host.node = Node(self.model.span(host.device, start, end), self.model.model_id, self.model.digest,
                             limits=limits, wall_clock=trio.current_time,
                             token_seconds=step_seconds(host.device, end - start, 1),
                             balance=balance, load_span=load, seed=f"{self.world.seed}:balance:{host.peer_id}")
            host.state = "up"
            self.world.trace.record("node_up", peer=host.peer_id, region=host.region, device=host.device.name,
                                    blocks=[start, end])
            if self.world.fetch is not None:
                self.world.fetch.host_up(host)
            directory = HostDirectory(self.world.directory, host, self)
            if self.world.nat is not None:  # `[nat]`: the real ReachKeeper beside the node (`simulations.nat`)
                await self.world.nat.serve(host, transport, host.node, directory, task_status=task_status)
            else:
                await host.node.run(transport, directory, task_status=task_status)

    async def _session(self, host: Host, session_s: float) -> str:
        """Serve for `session_s`, thawing from freezes; returns how the session ends."""
        c = self.scenario.churn
        while True:
            with trio.CancelScope() as host.waiting:
                await trio.sleep(session_s)
            if host.departing:
                return "leave"
            how = churn.departure(host.rng, c) if host.kind == "household" else "crash"
            if how != "freeze":
                return how
            self.network.freeze(host.peer_id)
            host.state = "frozen"
            self.world.trace.record("node_freeze", peer=host.peer_id)
            await trio.sleep(c.freeze_for_s)
            if host.rng.random() < c.freeze_then_crash:
                return "crash"
            self.network.restore(host.peer_id)
            host.state = "up"
            self.world.trace.record("node_thaw", peer=host.peer_id)
            session_s = churn.session_length(host.rng, c.shape, c.median_s)

    def _end(self, host: Host, how: str, nursery: trio.Nursery) -> None:
        self.world.trace.record(f"node_{how}", peer=host.peer_id)
        if how == "leave":
            host.state = "draining"
            host.node.stop()  # drains: tells its sessions to go elsewhere, withdraws its record
        else:
            self.network.crash(host.peer_id)
            host.state = "down"
            nursery.cancel_scope.cancel()

    def depart(self, host: Host) -> None:
        """Leave now (drained, as on shutdown), if up; a frozen host leaves when it next wakes."""
        host.departing = True
        if host.state == "up" and host.waiting is not None:
            host.state = "draining"  # no longer counted as serving, from this moment
            host.waiting.cancel()

    def kill(self, host: Host) -> None:
        """Gone at once and for good (a data-center outage)."""
        if host.state == "down" or host.life is None:
            return
        self.world.trace.record("node_killed", peer=host.peer_id)
        self.network.crash(host.peer_id)
        host.state = "down"
        host.life.cancel()
