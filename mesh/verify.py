"""Checking a hop's answers: did a node return what its blocks compute on the inputs it was sent?

A `Verifier` is a scheme that takes a `Claim` (a block range's input history and the outputs a
route hop returned for its latest steps) and gives a `Finding`, in two halves (`start`, then
`finish` later) so the work it asks of others overlaps the generation. `mesh.spot_check` decides
when to check and what to do about a liar; the scheme only says who is wrong. The one scheme here,
`RecomputeVerifier`, computes the claimed steps again elsewhere:

- a **checker**: a second node serving the same blocks with the same quantization, holding a
  session of its own for the range, kept for the generation. Each check sends it every input it
  has not seen, in one message whose chunks are the original steps (so its passes, and its KV
  cache, are the route hop's: on the same kind of machine an honest answer is bit-identical), and
  reads its answer when the check finishes. Its cost is one more computation of every position of
  the range (a KV cache makes a check of step s need every step before it), but one message per
  check, not one per step. (A fresh session replaying the whole history for each check would cost
  about R x n^2 / 2 positions for n tokens instead of n: 4x more at R = 0.1 and n = 64.)
- an **arbiter** when the two disagree beyond the tolerance: a third node given the whole history
  in one message, or, when no third node covers the range, this device computing the blocks
  itself (`LocalBlocks`, up to a size). Whoever the arbiter contradicts, while agreeing with the
  other, lied; with no such verdict the disagreement is only reported.

Distances are per token row: the RMS of the difference over the RMS of the reference. Two nodes
whose span infos name the same `kernels` (and quantization) compute bit-identical results, so the
tolerance between them is `DEFAULT_TOLERANCE` (or the client's); between different kernels, whose
int8 activations round differently in a few rows, it is at least `CROSS_KERNEL_TOLERANCE`, and
checkers with the hop's kernels are preferred. How both were measured: docs/security.md. A cheaper scheme
(fingerprints of the activations, checked by a prefill instead of a replay) would implement the
same `Verifier` face.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import trio
import trio.testing

from mesh.session import HopFailed, HopSession, SentStep, StepRecord
from mesh.virtual_time import VirtualClock
from protocol import Codec, decode_tensor, encode_tensor
from shard.compute import kernel_signature
from shard.errors import ShardError
from shard.interfaces import Span
from shard.model_dir import OpenModel, open_model_dir
from shard.span import block_bytes, load_span

log = logging.getLogger("hearth.client")

DEFAULT_TOLERANCE = 5e-3  # relative RMS per token row, between the same kernels: docs/security.md
CROSS_KERNEL_TOLERANCE = 0.015  # between different kernels (honest rows measured up to 0.011: docs/security.md)
LOCAL_ARBITER_MAX_BYTES = 2 << 30  # weights this device loads at most to arbitrate a range itself
NODE_PASS_TOKENS = 128  # nodes run a long step as passes of this many tokens (SessionLimits.prefill_chunk_tokens)
ARBITERS_TRIED = 2  # third nodes asked before the client computes the range itself
CLIENT = "client"  # the arbiter's name when this device computed the blocks
T = TypeVar("T")


def row_distance(claimed: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per token row of two [B, T, D] arrays: RMS of the difference over the reference's RMS -> [B * T]."""
    difference = np.sqrt(np.mean(np.square(claimed - reference, dtype=np.float64), axis=-1))
    scale = np.sqrt(np.mean(np.square(reference, dtype=np.float64), axis=-1))
    return (difference / np.maximum(scale, 1e-30)).ravel()


@dataclass(frozen=True)
class Claim:
    """What one route hop answered for blocks [start, end) since they were last verified."""

    start: int
    end: int
    peer_id: str  # the hop's node
    codec: Codec  # the hop's session codec: a checker is sent, and answers, the same values
    history: Sequence[StepRecord]  # every input of the range from position 0, in the original steps
    outputs: Sequence[StepRecord]  # the hop's answers to check: its last steps' outputs, in order

    @property
    def since(self) -> int:
        return self.outputs[0].start_position

    @property
    def length(self) -> int:
        return sum(record.hidden.shape[1] for record in self.history)


@dataclass(frozen=True)
class Finding:
    start: int
    end: int
    peer_id: str  # the hop's node
    checker: str | None  # who computed the steps again (None: nobody could: the steps stay unchecked)
    distance: float = 0.0  # the worst row's distance between the hop's answer and the checker's
    agreed: bool = True
    liar: str | None = None  # whom arbitration found wrong: the hop's node or the checker
    arbiter: str | None = None  # a peer id, or CLIENT

    @property
    def checked(self) -> bool:
        return self.checker is not None


class Verifier(Protocol):
    """A verification scheme (`RecomputeVerifier`; a fingerprint scheme could replace it). A check
    is started, then finished later, so the work it asks of others can overlap the generation's."""

    async def prepare(self, hop: HopSession) -> None:
        """Get ready to check a route hop (what set-up a check of it will need, before it is due)."""

    async def start(self, claim: Claim) -> PendingCheck:
        """Ask for whatever the check needs (the steps computed again, say), without waiting."""

    async def finish(self, pending: PendingCheck) -> Finding:
        """Whether the claim's outputs are right, and if not who lied."""

    def rewind(self, position: int) -> None:
        """The generation went back to `position`: forget every input from there on."""

    async def aclose(self) -> None: ...


class Replicas(Protocol):
    """Where checkers come from (the client: `mesh.client.Client.covering`)."""

    async def covering(self, start: int, end: int, *, fresh: bool = False) -> list[tuple[str, str, str]]:
        """(peer id, quantization, kernels) of every peer serving blocks [start, end), nearest first;
        `fresh`: looked up now, not as last seen."""


Opener = Callable[[str, int, int, Codec | None], Awaitable[HopSession]]


@dataclass
class PendingCheck:
    """A check started: the claim, and for `RecomputeVerifier` the checker's step in flight."""

    claim: Claim
    checker: HopSession | None = None  # None: no checker could be found (the check ends unchecked)
    sent: SentStep | None = None  # the catch-up sent to the checker, answer not yet read
    answer: np.ndarray | None = None  # or its answer already (a node that takes no chunks: stepped through)
    skip: int = 0  # rows of the answer before the claimed positions


class RecomputeVerifier:
    """Checks by computing the steps again on a checker node, with a third opinion on disagreement."""

    def __init__(self, replicas: Replicas, open_hop: Opener, *, banned: Callable[[], frozenset[str]],
                 timeout: Callable[[int], float], tolerance: float = DEFAULT_TOLERANCE,
                 local: LocalBlocks | None = None):
        self.replicas, self.open_hop, self.banned, self.timeout = replicas, open_hop, banned, timeout
        self.tolerance, self.local = tolerance, local
        self.checkers: dict[tuple[int, int], HopSession] = {}
        self.refused: set[str] = set()  # peers that failed as checkers in this generation
        self._covering: dict[tuple[int, int], list[tuple[str, str, str]]] = {}  # looked up once per range
        self._kernels: dict[str, str] = {CLIENT: kernel_signature()}  # each peer's, as its span info said

    async def check(self, claim: Claim) -> Finding:
        return await self.finish(await self.start(claim))

    async def prepare(self, hop: HopSession) -> None:
        """Open `hop`'s checker now, beside the route's sessions, not during the first check."""
        claim = Claim(hop.start, hop.end, hop.peer_id, hop.codec, (), ())
        candidates = await self._candidates(claim)
        if candidates:
            await self._checker(claim, candidates)

    async def start(self, claim: Claim) -> PendingCheck:
        """The range's checker (kept from earlier checks, else opened on the first candidate that
        works) sent every input of `claim` it has not seen: in one message whose chunks are the
        original steps, when the node takes chunks."""
        pending = PendingCheck(claim)
        candidates = await self._candidates(claim)
        while candidates:
            checker = await self._checker(claim, candidates)
            if checker is None:
                break
            try:
                await self._send_catch_up(checker, pending)
                return pending
            except HopFailed as err:
                log.info("checker %s failed: %s", checker.peer_id, err)
                await self._refuse(checker, candidates)
        pending.checker = None
        return pending

    async def finish(self, pending: PendingCheck) -> Finding:
        claim, checker = pending.claim, pending.checker
        if checker is None:
            return Finding(claim.start, claim.end, claim.peer_id, None)
        try:
            answer = await self._receive(pending)
        except HopFailed as err:
            log.info("checker %s failed: %s", checker.peer_id, err)
            await self._refuse(checker, [])
            return await self.check(claim)  # on the next candidate, from scratch
        claimed = _concat(claim.outputs)
        distance = float(row_distance(claimed, answer).max())
        tolerance = self._tolerance(claim.peer_id, checker.peer_id)
        finding = Finding(claim.start, claim.end, claim.peer_id, checker.peer_id, distance, distance <= tolerance)
        if finding.agreed:
            return finding
        log.warning("hop %s for blocks [%d, %d) and checker %s disagree by %.2g (tolerance %.2g) from position %d",
                    claim.peer_id, claim.start, claim.end, checker.peer_id, distance, tolerance, claim.since)
        others = [peer for peer in await self._candidates(claim) or [] if peer != checker.peer_id]
        return await self._arbitrate(claim, finding, claimed, answer, others)

    def rewind(self, position: int) -> None:
        for checker in self.checkers.values():
            checker.rewind(position)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for checker in self.checkers.values():
                await checker.close()
        self.checkers.clear()

    async def _candidates(self, claim: Claim) -> list[str] | None:
        """Peers that may check `claim`: the same blocks with the same quantization as its hop's
        node, not banned, those with its kernels first; None when the hop's node is unknown (its
        record is gone)."""
        excluded = self.banned() | self.refused | {claim.peer_id}
        for fresh in (False, True):  # what this generation looked up first; again if that is used up
            covering = await self._covering_range(claim.start, claim.end, fresh=fresh)
            quantization = next((quant for peer, quant, _ in covering if peer == claim.peer_id), None)
            found = [peer for peer, quant, _ in covering if quant == quantization and peer not in excluded]
            if found:  # stable: nearest first among the same kernels, then the rest
                return sorted(found, key=lambda peer: self._kernels.get(peer) != self._kernels.get(claim.peer_id))
        return None if quantization is None else []

    async def _covering_range(self, start: int, end: int, *, fresh: bool = False) -> list[tuple[str, str, str]]:
        if fresh or (start, end) not in self._covering:
            self._covering[(start, end)] = await self.replicas.covering(start, end, fresh=fresh)
            self._kernels.update((peer, kernels) for peer, _, kernels in self._covering[(start, end)])
        return self._covering[(start, end)]

    def _tolerance(self, one: str, other: str) -> float:
        """How far two peers' (or a peer's and this device's, `CLIENT`) honest answers may be apart."""
        if self._kernels.get(one) == self._kernels.get(other):
            return self.tolerance
        return max(self.tolerance, CROSS_KERNEL_TOLERANCE)

    async def _checker(self, claim: Claim, candidates: list[str]) -> HopSession | None:
        """The range's checker if it is still a candidate, else a session on the first candidate
        that opens one (those that do not are dropped from `candidates`)."""
        key = (claim.start, claim.end)
        checker = self.checkers.get(key)
        if checker is not None and checker.peer_id in candidates:
            return checker
        await self._drop(key)  # banned since, or the route's hop now
        while candidates:
            try:
                self.checkers[key] = await self.open_hop(candidates[0], claim.start, claim.end, claim.codec)
                return self.checkers[key]
            except HopFailed as err:
                log.info("checker %s unavailable: %s", candidates[0], err)
                self.refused.add(candidates.pop(0))
        return None

    async def _refuse(self, checker: HopSession, candidates: list[str]) -> None:
        self.refused.add(checker.peer_id)
        if checker.peer_id in candidates:
            candidates.remove(checker.peer_id)
        if self.checkers.get((checker.start, checker.end)) is checker:
            await self._drop((checker.start, checker.end))

    async def _send_catch_up(self, session: HopSession, pending: PendingCheck) -> None:
        claim = pending.claim
        session.rewind(claim.since)  # never ahead of the claim (a rewound generation)
        start = session.length
        records = [record for record in claim.history if record.start_position >= start]
        if not records:
            raise HopFailed(session.peer_id, claim.start, claim.end, f"has positions to {start}, the claim from {claim.since}")
        pending.checker, pending.skip, pending.sent, pending.answer = session, claim.since - start, None, None
        if session.replays_chunks or len(records) == 1:
            hidden = np.concatenate([record.hidden for record in records], axis=1)
            chunks = tuple(record.hidden.shape[1] for record in records) if len(records) > 1 else ()
            pending.sent = await session.send_step(hidden, start, chunks=chunks, timeout=self.timeout(hidden.shape[1]))
        else:
            pending.answer = np.concatenate([await session.step(record.hidden, record.start_position,
                                                                timeout=self.timeout(record.hidden.shape[1]))
                                             for record in records], axis=1)

    async def _receive(self, pending: PendingCheck) -> np.ndarray:
        """The checker's outputs for the claimed positions."""
        answer = pending.answer
        if answer is None:
            answer = await pending.checker.receive_step(pending.sent, timeout=self.timeout(pending.sent.hidden.shape[1]))
        return answer[:, pending.skip:]

    async def _catch_up(self, session: HopSession, claim: Claim) -> np.ndarray:
        pending = PendingCheck(claim)
        await self._send_catch_up(session, pending)
        return await self._receive(pending)

    async def _arbitrate(self, claim: Claim, finding: Finding, claimed: np.ndarray, answer: np.ndarray,
                         others: list[str]) -> Finding:
        """A third opinion: nodes first, then this device. Whom it contradicts while agreeing with
        the other lied; else the disagreement stands undecided."""
        for arbiter in others[:ARBITERS_TRIED]:
            try:
                session = await self.open_hop(arbiter, claim.start, claim.end, claim.codec)
            except HopFailed as err:
                log.info("arbiter %s unavailable: %s", arbiter, err)
                continue
            try:
                reference = await self._catch_up(session, claim)
            except HopFailed as err:
                log.info("arbiter %s failed: %s", arbiter, err)
                await session.close()
                continue
            verdict = self._verdict(claim, finding, claimed, answer, reference, arbiter)
            if verdict.liar == finding.checker:  # the arbiter holds the whole history: it checks from now on
                await self._drop((claim.start, claim.end))
                self.checkers[(claim.start, claim.end)] = session
            else:
                await session.close()
            if verdict.liar is not None:
                return verdict
        quantization = next((quant for peer, quant, _ in await self._covering_range(claim.start, claim.end)
                             if peer == claim.peer_id), "none")
        if self.local is not None and self.local.can_run(claim.start, claim.end, quantization):
            try:
                reference = await self.local.run(claim, quantization)
            except (ShardError, MemoryError, OSError) as err:
                log.warning("cannot compute blocks [%d, %d) here to arbitrate: %s", claim.start, claim.end, err)
            else:
                verdict = self._verdict(claim, finding, claimed, answer, reference, CLIENT)
                if verdict.liar == finding.checker:
                    await self._drop((claim.start, claim.end))
                return verdict
        log.warning("no arbiter could decide between %s and %s for blocks [%d, %d)",
                    claim.peer_id, finding.checker, claim.start, claim.end)
        return finding

    def _verdict(self, claim: Claim, finding: Finding, claimed: np.ndarray, answer: np.ndarray,
                 reference: np.ndarray, arbiter: str) -> Finding:
        to_hop = float(row_distance(claimed, reference).max())
        to_checker = float(row_distance(answer, reference).max())
        hop_ok = to_hop <= self._tolerance(claim.peer_id, arbiter)
        checker_ok = to_checker <= self._tolerance(finding.checker, arbiter)
        liar = None
        if checker_ok and not hop_ok:
            liar = claim.peer_id
        elif hop_ok and not checker_ok:
            liar = finding.checker
        log.warning("arbiter %s: %.2g from hop %s, %.2g from checker %s: %s", arbiter, to_hop, claim.peer_id,
                    to_checker, finding.checker, f"{liar} lied" if liar else "undecided")
        return Finding(finding.start, finding.end, finding.peer_id, finding.checker, finding.distance, False,
                       liar=liar, arbiter=arbiter)

    async def _drop(self, key: tuple[int, int]) -> None:
        checker = self.checkers.pop(key, None)
        if checker is not None:
            with trio.CancelScope(shield=True):
                await checker.close()


class LocalBlocks:
    """Blocks this device computes itself to arbitrate, when no third node covers a range: loaded
    once per range and quantization, up to `max_bytes` of weights."""

    def __init__(self, model_dir: OpenModel | str | Path, *, max_bytes: int = LOCAL_ARBITER_MAX_BYTES):
        self.model_dir, self.max_bytes = model_dir, max_bytes
        self._spans: dict[tuple[int, int, str], Span] = {}

    @functools.cached_property
    def model(self) -> OpenModel:
        return open_model_dir(self.model_dir)  # opened (and its files checked) only if ever needed

    def can_run(self, start: int, end: int, quantization: str) -> bool:
        quant, _, group = quantization.partition("-g")
        try:
            return block_bytes(self.model.config, quant, int(group or 32)) * (end - start) <= self.max_bytes
        except (ShardError, ValueError):  # a quantization this device does not know
            return False

    async def run(self, claim: Claim, quantization: str) -> np.ndarray:
        """The range's outputs for the claimed positions, computed here from the whole history as
        the nodes received it (through the hop's codec), in their passes, returned as they would be."""
        span = await self._span(claim.start, claim.end, quantization)
        wire = [decode_tensor(encode_tensor(record.hidden, claim.codec)) for record in claim.history]
        passes = tuple(piece for record in claim.history for piece in _pieces(record.hidden.shape[1]))

        def compute() -> np.ndarray:
            cache = span.new_cache(1, claim.length)
            return span.run(np.concatenate(wire, axis=1), cache, passes)

        output = await _off_the_loop(compute)
        return decode_tensor(encode_tensor(output[:, claim.since:], claim.codec))

    async def _span(self, start: int, end: int, quantization: str) -> Span:
        key = (start, end, quantization)
        if key not in self._spans:
            quant, _, group = quantization.partition("-g")
            self._spans[key] = await _off_the_loop(
                lambda: load_span(self.model, start, end, quant=quant, group_size=int(group or 32)))
        return self._spans[key]


async def _off_the_loop(work: Callable[[], T]) -> T:
    """`work()` in a worker thread, or inline under a virtual clock (tests, the simulator): there a
    thread's time is invisible, and the clock would jump past every deadline while it runs."""
    if isinstance(trio.lowlevel.current_clock(), (VirtualClock, trio.testing.MockClock)):
        return work()
    return await trio.to_thread.run_sync(work)


def _pieces(tokens: int) -> list[int]:
    """One step's passes on a node: pieces of at most NODE_PASS_TOKENS."""
    return [min(NODE_PASS_TOKENS, tokens - done) for done in range(0, tokens, NODE_PASS_TOKENS)]


def _concat(records: Sequence[StepRecord]) -> np.ndarray:
    return np.concatenate([record.hidden for record in records], axis=1)

