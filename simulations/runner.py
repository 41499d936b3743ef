"""Running a scenario: one deterministic `trio.run` in virtual time, and what came out of it.

Determinism: trio's scheduler shuffles each batch of runnable tasks with a module-level random
generator; for a run we sort batches by task creation (as trio does under Hypothesis) and seed
that generator from the scenario's seed, so one seed always gives one schedule. Every other draw
comes from generators seeded by the scenario seed and a purpose. The clock is a
`mesh.virtual_time.VirtualClock`: it jumps to the next deadline or timer whenever every task
waits, so hours pass in minutes of wall time.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from mesh.virtual_time import VirtualClock
from simulations.model import StandInModel, TorchModel
from simulations.progress import Progress
from simulations.scenario import Scenario, ScenarioError
from simulations.users import SessionRecord
from simulations.world import Sample, World
from shard.compute import threads as compute_threads, use_threads


@dataclass
class RunResult:
    scenario: Scenario
    trace_hash: str
    wall_s: float
    virtual_s: float
    sessions: list[SessionRecord]
    samples: list[Sample]
    violations: list[str]
    marks: list[tuple[float, str]]
    counts: dict[str, int]
    hosts: dict[str, int]
    network: dict[str, int]
    host_regions: dict[str, str]
    trace_lines: list[str] = field(default_factory=list)
    joins: list[dict] = field(default_factory=list)
    restorations: list[dict] = field(default_factory=list)
    hostile: dict = field(default_factory=dict)  # `HostileSwarm.summary`; empty without hostile hosts
    fetch: dict = field(default_factory=dict)  # `Downloads.summary`; empty without `[fetch]` seeds
    nat: dict = field(default_factory=dict)  # `simulations.nat.Reach.summary`; empty without `[nat]`

    @property
    def ok(self) -> bool:
        return not self.violations


@contextmanager
def deterministic_scheduling(seed: int) -> Iterator[None]:
    """Make trio's choice among runnable tasks a function of `seed` (restored afterwards)."""
    from trio._core import _run

    saved_flag, saved_state = _run._ALLOW_DETERMINISTIC_SCHEDULING, _run._r.getstate()
    _run._ALLOW_DETERMINISTIC_SCHEDULING = True
    _run._r.seed(seed)
    try:
        yield
    finally:
        _run._ALLOW_DETERMINISTIC_SCHEDULING = saved_flag
        _run._r.setstate(saved_state)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny forward passes inline in the event loop: extra intra-op threads only spin (and, on a
    loaded machine, make a run tens of times slower)."""
    saved = compute_threads()
    use_threads(1)
    try:
        yield
    finally:
        use_threads(saved)


@contextmanager
def rare_collections(threshold: int = 50_000) -> Iterator[None]:
    """Python's cycle collector, first generation every `threshold` allocations instead of 700: a run
    allocates messages, arrays and trio's exceptions by the million, and at the default the
    collector took about 9% of a 1,000-node run's wall time (under 1% at 50,000). Restored afterwards."""
    saved = gc.get_threshold()
    gc.set_threshold(threshold, *saved[1:])
    try:
        yield
    finally:
        gc.set_threshold(*saved)


@contextmanager
def quiet_logs(level: int = logging.ERROR) -> Iterator[None]:
    """The node and client log every failover as a warning; a simulation has thousands."""
    logger = logging.getLogger("hearth")
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)


def run_scenario(scenario: Scenario, *, checkpoint: str | Path | None = None, progress: bool = False,
                 keep_trace: bool = False, log_level: int = logging.ERROR) -> RunResult:
    """Run `scenario` (its seed included) to the end; never raises for a violated invariant."""
    if scenario.compute == "torch" and checkpoint is None:
        raise ScenarioError(scenario.name, "compute = 'torch' needs a checkpoint directory (--checkpoint)")
    with tempfile.TemporaryDirectory(prefix="hearth-sim-") as workdir:
        model = TorchModel(scenario.model, Path(checkpoint)) if scenario.compute == "torch" \
            else StandInModel(scenario.model, Path(workdir))
        bar = Progress(f"{scenario.name} seed {scenario.seed}", enabled=progress)
        world = World(scenario, model, progress=bar, keep_trace=keep_trace)
        started = time.perf_counter()
        with deterministic_scheduling(scenario.seed), quiet_logs(log_level), one_torch_thread(), rare_collections():
            trio.run(world.simulate, clock=VirtualClock())
        wall = time.perf_counter() - started
    return _result(world, wall)


def _result(world: World, wall: float) -> RunResult:
    hosts = {"household": 0, "cloud": 0, "restarts": world.trace.counts["node_up"] - len(world.swarm.hosts)}
    for host in world.swarm.hosts.values():
        hosts[host.kind] += 1
    network = {"messages": world.network.messages, "losses": world.network.losses,
               "resets": world.trace.counts["connection_reset"]}
    return RunResult(world.scenario, world.trace.digest, wall, world.ended_at, world.sessions, world.samples,
                     world.violations, world.marks, dict(world.trace.counts), hosts, network,
                     {h.peer_id: h.region for h in world.swarm.hosts.values()}, world.trace.lines,
                     world.joins, world.restorations,
                     world.hostile.summary(world.sessions) if world.hostile is not None else {},
                     world.fetch.summary(world.sessions) if world.fetch is not None else {},
                     world.nat.summary() if world.nat is not None else {})
