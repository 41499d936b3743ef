"""Users: real `mesh.Client`s asking for completions, and what became of every session.

A user lives in a region, pauses between requests (exponential, so requests are a Poisson
process, busier at the day's peak), and asks for a greedy completion of a random prompt. Each
session ends one of three ways: completed (its tokens are checked against the failure-free
reference), failed with an explicit error (`NoRouteError`, `GenerationFailed`, a refusal), or hung:
still running `hang_grace_s` past the request's deadline, which is an invariant violation. So is
an unexpected exception, tokens that differ from the reference (a lie that got past the spot
checks, `[clients] verify_rate`), or an honest peer banned for lying.
"""

from __future__ import annotations

import random
from contextlib import aclosing
from dataclasses import dataclass, field

import trio

from mesh.client import Client, ClientOptions, GenerationReport
from mesh.memory_nat import NatType
from mesh.memory_transport import MemoryTransport
from mesh.pipeline import GenerationFailed
from mesh.routing import NoRouteError
from mesh.session import HopFailed
from protocol import Codec
from shard.errors import ShardError
from shard.sampling import SamplingParams
from simulations import churn
from simulations.drafts import ReferenceDrafter
from simulations.trace import token_digest

EXPLICIT_ERRORS = (NoRouteError, GenerationFailed, HopFailed, ShardError)


@dataclass
class SessionRecord:
    user: str
    region: str
    started: float
    prompt_tokens: int
    wanted_tokens: int
    outcome: str = "running"  # completed, failed, hung
    error: str = ""
    ended: float = 0.0
    tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    hops: int = 0
    peers: list[str] = field(default_factory=list)  # the route at the end
    recoveries: list[dict] = field(default_factory=list)  # {"at", "seconds", "reason", "replayed", "failed_peer"}
    met: list[str] = field(default_factory=list)  # every peer on the route at some point: the last, failed, replacements
    verification: dict = field(default_factory=dict)  # `mesh.spot_check.VerificationReport.to_json`
    digest: str = ""  # of the tokens (`simulations.trace.token_digest`)
    passes: int = 0  # decode passes through the route, with speculation (`mesh.speculative.SpeculationReport`)
    drafted: int = 0  # drafts sent
    accepted: int = 0  # drafts kept

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_s + self.decode_s
        return self.tokens / total if total > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over decode time (the first comes from the prefill)."""
        return (self.tokens - 1) / self.decode_s if self.decode_s > 0 and self.tokens > 1 else 0.0

    def to_json(self) -> dict:
        return {"user": self.user, "region": self.region, "started": round(self.started, 3),
                "ended": round(self.ended, 3), "outcome": self.outcome, "error": self.error,
                "prompt_tokens": self.prompt_tokens, "tokens": self.tokens, "route": self.peers, "digest": self.digest,
                "tokens_per_s": round(self.tokens_per_s, 3), "prefill_s": round(self.prefill_s, 4),
                "decode_s": round(self.decode_s, 4), "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
                "recoveries": self.recoveries, "verification": self.verification,
                "speculation": {"passes": self.passes, "drafted": self.drafted, "accepted": self.accepted}}


class User:
    def __init__(self, world, peer_id: str, region: str, *, think_s: float, until: float):
        self.world, self.peer_id, self.region = world, peer_id, region
        self.think_s, self.until = think_s, until
        self.rng = random.Random(f"{world.seed}:user:{peer_id}")
        self.generations = 0  # generations drafted for (speculation)
        nat = world.nat.draw(peer_id, "clients") if world.nat is not None else NatType.NONE
        world.network.place(peer_id, region, world.scenario.device(world.scenario.clients.device), nat)

    def options(self) -> ClientOptions:
        spec = self.world.scenario.clients
        return ClientOptions(codec=Codec.FP32, open_timeout_s=spec.open_timeout_s, probe_timeout_s=spec.probe_timeout_s,
                             step_timeout_s=spec.step_timeout_s, request_timeout_s=spec.request_timeout_s,
                             ban_s=spec.ban_s, verify_rate=spec.verify_rate, seed=self.rng.randrange(2**32),
                             speculative=spec.speculative, max_drafts=spec.max_drafts)

    def drafter(self, prompt_ids: list[int]) -> ReferenceDrafter:
        """A generation's drafter (`Client(drafter=...)`), seeded by the user and the generation's
        number, not from `rng`, so a run with speculation asks for the same requests as one without."""
        self.generations += 1
        rng = random.Random(f"{self.world.seed}:drafts:{self.peer_id}:{self.generations}")
        return ReferenceDrafter(self.world.model.weights, self.world.model.blocks,
                                acceptance=self.world.scenario.clients.draft_acceptance, rng=rng)

    async def run(self) -> None:
        """Requests until `until`; the last one may finish after it."""
        model = self.world.model
        async with MemoryTransport.open(self.world.network, self.peer_id) as transport:
            # stand-in weights: drafts of their true continuation; a real checkpoint: the client's prompt lookup
            drafter = self.drafter if hasattr(model, "weights") else None
            client = Client(transport, self.world.directory, model.model_dir, options=self.options(),
                            head=model.head, tokenizer=None, drafter=drafter)
            while True:
                rate = churn.day_factor(trio.current_time(), self.world.scenario.day_night) / self.think_s
                at = trio.current_time() + self.rng.expovariate(rate)
                if at >= self.until:
                    return
                await trio.sleep_until(at)
                await self.session(client)

    def _request(self) -> tuple[list[int], int]:
        spec, config = self.world.scenario.clients, self.world.model.config
        room = config.max_position_embeddings - 1
        prompt_len = min(self.rng.randint(*spec.prompt_tokens), room - 1)
        wanted = min(self.rng.randint(*spec.new_tokens), room - prompt_len)
        return [self.rng.randrange(config.vocab_size) for _ in range(prompt_len)], wanted

    async def session(self, client: Client) -> SessionRecord:
        prompt, wanted = self._request()
        world, spec = self.world, self.world.scenario.clients
        record = SessionRecord(self.peer_id, self.region, trio.current_time(), len(prompt), wanted)
        world.sessions.append(record)
        world.trace.record("session_start", user=self.peer_id, prompt=len(prompt), wanted=wanted)
        report = GenerationReport(prompt)
        world.in_flight += 1
        try:
            with trio.move_on_after(spec.request_timeout_s + world.scenario.checks.hang_grace_s) as scope:
                await self._generate(client, prompt, wanted, report)
                record.outcome = "completed"
            if scope.cancelled_caught:
                record.outcome = "hung"
                world.violation(f"session of {self.peer_id} started at {record.started:.3f} s hung: no outcome "
                                f"{world.scenario.checks.hang_grace_s:g} s past its deadline")
        except EXPLICIT_ERRORS as err:
            record.outcome, record.error = "failed", f"{type(err).__name__}: {err}"
        except Exception as err:  # a bug in the code under test (or the simulator): a violation
            record.outcome, record.error = "failed", f"unexpected {type(err).__name__}: {err}"
            world.violation(f"session of {self.peer_id} started at {record.started:.3f} s raised {err!r}")
        finally:
            world.in_flight -= 1
        self._finish(record, report, prompt, wanted)
        return record

    async def _generate(self, client: Client, prompt: list[int], wanted: int, report: GenerationReport) -> None:
        params = SamplingParams(max_new_tokens=wanted)
        async with aclosing(client.generate(prompt_ids=prompt, params=params, report=report)) as tokens:
            async for _ in tokens:
                self.world.tokens_generated += 1

    def _finish(self, record: SessionRecord, report: GenerationReport, prompt: list[int], wanted: int) -> None:
        record.ended = trio.current_time()
        record.tokens, record.digest = len(report.token_ids), token_digest(report.token_ids)
        record.prefill_s, record.decode_s, record.hops = report.prefill_s, report.decode_s, len(report.hops)
        record.peers = [hop.peer_id for hop in report.hops]
        record.recoveries = [{"at": round(r.detected_at, 3), "seconds": round(r.seconds, 4), "reason": r.reason[:120],
                              "replayed": r.tokens_replayed, "failed_peer": r.failed_peer}
                             for r in report.recoveries]
        record.met = sorted(set(record.peers).union(*({r.failed_peer, *r.replacements} for r in report.recoveries)))
        record.verification = report.verification.to_json()
        spec = report.speculation
        record.passes, record.drafted, record.accepted = spec.passes, spec.drafted, spec.accepted
        hostile = self.world.hostile.ids if self.world.hostile is not None else frozenset()
        for peer in set(report.verification.banned) - hostile:
            self.world.violation(f"session of {self.peer_id} started at {record.started:.3f} s banned honest peer "
                                 f"{peer} for lying")
        if record.outcome == "completed":
            expected = self.world.model.reference(prompt, wanted)
            if report.token_ids != expected:
                self.world.violation(f"session of {self.peer_id} started at {record.started:.3f} s produced tokens "
                                     f"that differ from the failure-free run")
        self.world.trace.record("session_end", user=self.peer_id, outcome=record.outcome,
                                tokens=token_digest(report.token_ids), recoveries=len(record.recoveries),
                                error=record.error.split(":")[0])
