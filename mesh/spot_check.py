"""Spot-check verification of one generation: when to check, what to hold back, how to undo a lie.

With `ClientOptions.verify_rate` R > 0 the client runs a `SpotChecks` beside its route:

- **When**: after the prompt step, after each later step with probability R (a seeded draw), and
  after the last step, every hop of the route is checked, concurrently, for every step it has
  answered since the last check (`mesh.verify.Verifier`: a second node computes them again).
- **Pipelined**: a check is started (its checkers sent their inputs) and finished at the next
  one, so checkers compute while the generation goes on. The prompt step's check is finished one
  step later (the first token is held up by one step, not by a check interval); the last step's
  at once (the last tokens are not left unchecked).
- **Held back**: a token is given to the caller only once a finished check covers the step that
  produced it, so the caller never sees a token that could still be taken back: with R = 0.1
  tokens come in bursts of about ten, one check interval late.
- **Verified step**: a finished check that finds no liar on the route moves the last verified step
  to where it started: that position and the decoding's state then
  (`shard.generate.Decoding.checkpoint`).
- **A liar**: a hop's node contradicted by an arbiter is banned for good and every hop it serves
  replaced by failover's replay (`mesh.pipeline.RoutePipeline.evict`); the generation goes back
  to the last verified step (every hop forgets its inputs after it, nodes cut their caches, the
  decoding forgets the tokens chosen since, none of which the caller has seen) and continues
  through honest nodes. So the tokens the caller sees are those of an all-honest run. A checker
  caught lying is banned for good; the route's answers, confirmed by the arbiter, stand.
- **A failover between checks**: the failed hop's answers since the last check can no longer be
  checked (its session is gone), so the generation goes back to the last verified step too.
- **Undecided**: a hop and its checker disagree and no arbiter contradicts one while agreeing with
  the other (no third node and no local blocks, or an arbiter far from both): one of them lied,
  and the steps cannot be vouched for, so the generation fails (`GenerationFailed`) rather than
  give out tokens that may be wrong.

What it cost and found is a `VerificationReport` (`GenerationReport.verification`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import numpy as np
import trio

from mesh.pipeline import GenerationFailed, RoutePipeline
from mesh.session import HopSession, StepRecord
from mesh.verify import Claim, Finding, PendingCheck, Verifier
from shard.generate import Decoding, DecodingCheckpoint, Emitted

log = logging.getLogger("hearth.client")


@dataclass
class VerificationReport:
    rate: float = 0.0  # the share of steps after which the route was checked (0: verification off)
    checks: int = 0  # hop checks made: a hop's answers since the previous check computed again elsewhere
    disagreements: int = 0  # checks whose checker answered otherwise, beyond the tolerance
    banned: list[str] = field(default_factory=list)  # peers caught lying, banned for good by this client
    rollbacks: int = 0  # times the generation went back to its last verified step
    tokens_redone: int = 0  # tokens chosen, never shown, and chosen again after a rollback
    unchecked: int = 0  # hop checks for which no second node with the same blocks and quantization was found
    max_distance: float = 0.0  # the largest distance among the checks that agreed (honest noise)

    def text(self) -> str:
        """One line for logs and the demo's summary."""
        banned = f", banned {', '.join(peer[-6:] for peer in self.banned)}" if self.banned else ""
        return (f"spot checks at {self.rate:g}: {self.checks} checks, {self.disagreements} disagreements{banned}, "
                f"{self.rollbacks} rollbacks ({self.tokens_redone} tokens redone), {self.unchecked} unchecked "
                f"(no second node with the same blocks)")

    def to_json(self) -> dict:
        return {"rate": self.rate, "checks": self.checks, "disagreements": self.disagreements,
                "banned": list(self.banned), "rollbacks": self.rollbacks, "tokens_redone": self.tokens_redone,
                "unchecked": self.unchecked, "max_distance": float(f"{self.max_distance:.3g}")}


@dataclass(frozen=True)
class Checkpoint:
    position: int  # positions every hop has computed (and, for the last verified one, a check verified)
    decoding: DecodingCheckpoint


@dataclass
class InFlight:
    """Checks started and not finished: they cover the steps up to `checkpoint`."""

    checkpoint: Checkpoint
    checks: list[PendingCheck]


class SpotChecks:
    """One generation's checks over `pipeline`, whose `observe` hook it takes."""

    def __init__(self, rate: float, rng: random.Random, verifier: Verifier, pipeline: RoutePipeline,
                 decoding: Decoding, report: VerificationReport):
        self.rate, self.rng, self.verifier = rate, rng, verifier
        self.pipeline, self.decoding, self.report = pipeline, decoding, report
        self.verified = Checkpoint(0, decoding.checkpoint())  # the last verified step
        self.in_flight: InFlight | None = None
        self.held: list[tuple[Emitted, int]] = []  # tokens not yet given out, with the position after their step
        self.answers: dict[int, tuple[HopSession, list[StepRecord]]] = {}  # id(hop) -> answers not yet in a check
        self.recoveries_seen = 0  # the route's recoveries when the last check started
        pipeline.observe = self._observe

    def _observe(self, hop: HopSession, position: int, output: np.ndarray) -> None:
        self.answers.setdefault(id(hop), (hop, []))[1].append(StepRecord(position, output))

    async def after_step(self, emitted: Emitted, position: int, *, last: bool) -> list[Emitted] | None:
        """Hold `emitted` (chosen after the route computed up to `position`); the tokens checks have
        verified by now, in order ([] when none), or None when the generation went back to its last
        verified step (`resume` says where to go on)."""
        self.held.append((emitted, position))
        first = self.verified.position == 0 and self.in_flight is None  # the prompt step
        soon = self.verified.position == 0 and self.in_flight is not None  # the step after it
        if not (self.rng.random() < self.rate or first or soon or last):
            return []
        if not await self._finish():
            return None
        if len(self.pipeline.recoveries) != self.recoveries_seen:
            log.info("the route changed after position %d: going back there to check what follows",
                     self.verified.position)
            await self._rollback(liars=())
            return None
        await self._start(position)
        if last and not await self._finish():  # the last tokens are not left unchecked
            return None
        return self._release()

    async def prepare(self) -> None:
        """Once the route is open: the verifier's set-up for every hop (checkers' sessions), at once."""
        async with trio.open_nursery() as nursery:
            for hop in self.pipeline.hops:
                nursery.start_soon(self.verifier.prepare, hop)

    def resume(self, prompt_ids: list[int]) -> tuple[int, list[int]]:
        """After a rollback: the position to go on from and the token ids to send there."""
        tokens = self.decoding.token_ids
        return self.verified.position, ([tokens[-1]] if tokens else list(prompt_ids))

    async def aclose(self) -> None:
        await self.verifier.aclose()

    async def _start(self, position: int) -> None:
        """Start checking every hop's answers since the last check (each checker computes them
        while the generation goes on)."""
        claims = [Claim(hop.start, hop.end, hop.peer_id, hop.codec, list(hop.history), outputs)
                  for hop, outputs in self.answers.values() if outputs]
        self.answers.clear()
        pending: list[PendingCheck | None] = [None] * len(claims)

        async def start(index: int) -> None:
            pending[index] = await self.verifier.start(claims[index])

        async with trio.open_nursery() as nursery:
            for index in range(len(claims)):
                nursery.start_soon(start, index)
        self.in_flight = InFlight(Checkpoint(position, self.decoding.checkpoint()), pending)
        self.recoveries_seen = len(self.pipeline.recoveries)

    async def _finish(self) -> bool:
        """Finish the checks in flight: their steps are verified (True), or a liar on the route was
        caught and the generation went back to the last verified step (False)."""
        if self.in_flight is None:
            return True
        in_flight, self.in_flight = self.in_flight, None
        findings: list[Finding | None] = [None] * len(in_flight.checks)

        async def finish(index: int) -> None:
            findings[index] = await self.verifier.finish(in_flight.checks[index])

        async with trio.open_nursery() as nursery:
            for index in range(len(in_flight.checks)):
                nursery.start_soon(finish, index)
        liars = self._account(findings)
        undecided = next((f for f in findings if f.checked and not f.agreed and f.liar is None), None)
        if undecided is not None:
            raise GenerationFailed(f"hop {undecided.peer_id} and checker {undecided.checker} disagree on blocks "
                                   f"[{undecided.start}, {undecided.end}) and no arbiter decided which lied: "
                                   f"not giving out tokens that may be wrong")
        if liars:
            await self._rollback(liars=liars)
            return False
        self.verified = in_flight.checkpoint
        return True

    def _release(self) -> list[Emitted]:
        released = [emitted for emitted, position in self.held if position <= self.verified.position]
        self.held = self.held[len(released):]
        return released

    def _account(self, findings: list[Finding]) -> list[str]:
        """Count `findings` in the report, ban lying checkers; the route's peers caught lying."""
        report, liars = self.report, []
        for finding in findings:
            report.checks += finding.checked
            report.unchecked += not finding.checked
            report.disagreements += not finding.agreed
            if finding.checked and finding.agreed:
                report.max_distance = max(report.max_distance, finding.distance)
            if finding.liar is None:
                continue
            log.warning("peer %s caught returning wrong results for blocks [%d, %d) (arbiter: %s); banned",
                        finding.liar, finding.start, finding.end, finding.arbiter)
            if finding.liar not in report.banned:
                report.banned.append(finding.liar)
            if finding.liar == finding.peer_id:
                liars.append(finding.liar)
            else:
                self.pipeline.bans.ban_for_good(finding.liar)
        return liars

    async def _rollback(self, *, liars: list[str] | tuple[()]) -> None:
        """Back to the last verified step: hops and checkers forget what came after it, the
        decoding its tokens; then the liars' hops are replaced, replaying only the verified history."""
        verified = self.verified
        self.pipeline.rewind(verified.position)
        self.verifier.rewind(verified.position)
        self.report.rollbacks += 1
        self.report.tokens_redone += len(self.decoding.token_ids) - verified.decoding.n_tokens
        self.decoding.rewind(verified.decoding)
        self.held.clear()
        self.answers.clear()
        self.in_flight = None
        for liar in dict.fromkeys(liars):
            await self.pipeline.evict(liar, "caught returning wrong results by a spot check")
        self.recoveries_seen = len(self.pipeline.recoveries)
