"""One simulated world: the network, discovery, hosts, users and faults of a run, and its clock.

`World.simulate` is the whole run inside `trio.run` under a virtual clock (`simulations.runner`): hosts start
(then the hostile ones, if the scenario has any: `simulations.hostile`), churn and faults are
scheduled (with `[nat]`, the relay hosts start first: `simulations.nat`), users ask for completions until the scenario's duration, then the world waits for the
sessions in flight (each bounded by its deadline plus the hang grace) and stops. A sampler records
block coverage, throughput and the KV-budget invariant as it goes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import trio

from mesh.discovery import MemoryDirectory
from simulations import churn, faults
from simulations.fetch import Downloads
from simulations.hostile import HostileSwarm
from simulations.hosts import Swarm
from simulations.nat import Reach
from simulations.network import VirtualNetwork
from simulations.progress import Progress
from simulations.scenario import Scenario, hostile_hosts
from simulations.trace import Trace
from simulations.users import SessionRecord, User


@dataclass
class Sample:
    t: float
    live_nodes: int
    min_replicas: int
    covered: float  # share of blocks served by at least one live host
    in_flight: int
    tokens_per_s: float  # generated over the interval that ended at t
    replicas: list[int] = field(default_factory=list)
    reachable_covered: float | None = None  # `[nat]`: share of blocks served by a host a newcomer could reach


class World:
    def __init__(self, scenario: Scenario, model, *, progress: Progress, keep_trace: bool = False):
        self.scenario, self.model, self.seed = scenario, model, scenario.seed
        self.trace = Trace(keep_lines=keep_trace)
        self.network = VirtualNetwork(scenario.network, self.rng("network"), bandwidth_scale=model.bandwidth_scale)
        self.directory = MemoryDirectory(trio.current_time)
        self.fetch = Downloads(self) if scenario.fetch.seeds else None  # none: every host has the files
        self.nat = Reach(self) if scenario.nat.enabled else None  # none: no draw taken, no ReachKeeper run
        self.swarm = Swarm(self)
        self.hostile = HostileSwarm(self) if hostile_hosts(scenario) else None  # none: not a draw taken
        self.sessions: list[SessionRecord] = []
        self.samples: list[Sample] = []
        self.violations: list[str] = []
        self.marks: list[tuple[float, str]] = []
        self.in_flight = 0
        self.tokens_generated = 0
        self.progress = progress
        self.user_nursery: trio.Nursery | None = None
        self.ended_at = 0.0
        self.joins: list[dict] = []  # after each initial household joined: capacity and coverage
        self.restorations: list[dict] = []  # how long full coverage took to come back after an event

    def rng(self, purpose: str) -> random.Random:
        """A generator of its own for each purpose, so one change does not shift every other draw."""
        return random.Random(f"{self.seed}:{purpose}")

    def violation(self, what: str) -> None:
        self.violations.append(f"t={trio.current_time():.3f}s: {what}")
        self.trace.record("violation")

    def mark(self, label: str) -> None:
        """A moment the plots label (a scheduled fault)."""
        self.marks.append((trio.current_time(), label))

    async def simulate(self) -> None:
        end = self.scenario.duration_s
        async with trio.open_nursery() as nursery:
            if self.nat is not None:
                await self.nat.start(nursery)
            await self.swarm.start(nursery)
            if self.hostile is not None:
                await self.hostile.start(nursery)
            nursery.start_soon(self.swarm.keep_arriving, nursery, end)
            nursery.start_soon(faults.connection_resets, self, end)
            for event in self.scenario.events:
                nursery.start_soon(faults.run_event, self, event)
            nursery.start_soon(self._sample_forever)
            nursery.start_soon(self.progress.run, end)
            async with trio.open_nursery() as users:
                self.user_nursery = users
                self._start_users(users, end)
                await trio.sleep_until(end)  # flash crowds may still join until then
            self.ended_at = trio.current_time()
            self._sample()
            nursery.cancel_scope.cancel()
        self.progress.finish(self.ended_at)

    def _start_users(self, nursery: trio.Nursery, until: float) -> None:
        rng = self.rng("users")
        for index in range(self.scenario.clients.count):
            region = churn.weighted_choice(rng, self.scenario.regions)
            nursery.start_soon(User(self, f"u{index}", region, think_s=self.scenario.clients.think_s, until=until).run)

    async def _sample_forever(self) -> None:
        every = self.scenario.checks.sample_every_s
        while True:
            await trio.sleep(every)
            self._sample()

    def replicas(self) -> list[int]:
        """Per block, how many live hosts serve it."""
        replicas = [0] * self.model.blocks
        for host in self.swarm.live():
            for block in range(*host.span):
                replicas[block] += 1
        return replicas

    def note_join(self) -> None:
        """After an initial household joined: could the live hosts' memory cover the model, and do they?"""
        live = self.swarm.live()
        capacity = sum(min(self.model.blocks, self.model.span_length(h.device)) for h in live if h.kind == "household")
        self.joins.append({"t": round(trio.current_time(), 3), "hosts": len(live), "capacity_blocks": capacity,
                           "min_replicas": min(self.replicas())})

    async def watch_coverage(self, label: str, poll_s: float = 1.0, limit_s: float = 3600.0) -> None:
        """Wait until every block is served again (polling), and record how long that took."""
        began = trio.current_time()
        lowest = min(self.replicas())
        try:
            with trio.move_on_after(limit_s):
                while (now := min(self.replicas())) < 1:
                    await trio.sleep(poll_s)
                    lowest = min(lowest, now)
        finally:  # also when the run ends first
            covered = min(self.replicas()) >= 1
            self.restorations.append({"label": label, "at": round(began, 1), "lowest_min_replicas": lowest,
                                      "restored": covered,
                                      "after_s": round(trio.current_time() - began, 1) if covered else None})
            self.trace.record("coverage_restored" if covered else "coverage_not_restored", label=label)

    def _sample(self) -> None:
        now = trio.current_time()
        live = self.swarm.live()
        replicas = self.replicas()
        since = now - (self.samples[-1].t if self.samples else 0.0)
        rate = self.tokens_generated / since if since > 0 else 0.0
        self.tokens_generated = 0
        covered = sum(1 for r in replicas if r > 0) / len(replicas)
        reachable = None
        if self.nat is not None:
            served = {b for h in live if self.nat.reachable(h.peer_id) for b in range(*h.span)}
            reachable = len(served) / len(replicas)
        self.samples.append(Sample(now, len(live), min(replicas), covered, self.in_flight, rate, replicas, reachable))
        self.trace.record("sample", live=len(live), min_replicas=min(replicas), in_flight=self.in_flight)
        self._check_kv_budgets()

    def _check_kv_budgets(self) -> None:
        for host in self.swarm.hosts.values():
            manager = host.node.manager if host.node is not None else None
            if manager is not None and not 0 <= manager.reserved_bytes <= manager.limits.kv_cache_bytes:
                self.violation(f"node {host.peer_id} holds {manager.reserved_bytes} bytes of KV cache; "
                               f"its budget is {manager.limits.kv_cache_bytes}")
