"""The client library: find peers, plan a route, open a session per hop, generate text.

Embeddings, LM head, sampling and the tokenizer run here, from the user's own model directory, so
token ids and text never leave the device: only hidden states travel, hop by hop. With
`local_blocks` K the first K blocks run here too (`mesh.first_blocks`), so no peer receives token
embeddings; `trusted_peers` and a household's `swarm_secret` (`mesh.swarm_secret`) limit which
nodes receive hidden states at all.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import trio

from mesh.discovery import Discovery, PeerRecord
from mesh.errors import TransportError
from mesh.backoff import BanList
from mesh.batcher import Job, MicroBatcher
from mesh.draft_model import DraftModel
from mesh.first_blocks import FirstBlocks, LocalRun, check_local_blocks
from mesh.kept_sessions import DEFAULT_MAX_ROUTES, KeptRoute, KeptSessions
from mesh.pipeline import Recovery, RoutePipeline, StepTiming
from mesh.routing import DEFAULT_RTT_S, ROUTING_MODES, NoRouteError, Route, ServerSpan, plan_route
from mesh.session import CLIENT_SOFTWARE, HopFailed, HopSession, HopTimes, LinkBook, open_hop
from mesh.speculative import (
    DEFAULT_MAX_DRAFTS, MAX_DRAFTS, Drafter, DraftLength, PromptLookup, Speculation, SpeculationReport,
)
from mesh.spot_check import SpotChecks, VerificationReport
from mesh.swarm_secret import SwarmSecret, proof_of, refusal_reason
from mesh.transport import MessageStream, PathKind, Transport
from mesh.verify import DEFAULT_TOLERANCE, LocalBlocks, RecomputeVerifier
from protocol import AUTO, INFO_PROTOCOL, Codec, Error, Exchange, Hello, ProtocolError, Role, SpanInfo
from shard.errors import InvalidInput, PromptTooLong
from shard.generate import Decoding, Emitted
from shard.head import load_head
from shard.interfaces import Head
from shard.model_dir import OpenModel, open_model_dir
from shard.sampling import SamplingParams
from shard.tokenizer import TOKENIZER_FILE, Tokenizer

log = logging.getLogger("hearth.client")

SPAN_CACHE_MAX = 1 << 14  # peers whose last span info a client keeps (for planning), before it starts over
RELAYED_RTT_FACTOR = 2.0  # a relayed hop's round trip, as routing weighs it: direct hops are preferred
UPGRADE_RETRY_S = 600.0  # after hole punching to a peer failed, it is not tried again for this long (NATs rarely change)
KEEP_ROOM = 1024  # positions at least, for a route kept for prefix reuse: room for the conversation's next turn


@dataclass(frozen=True)
class ClientOptions:
    # activations on the wire: a Codec (FP32 is exact), or AUTO: per hop, fp16 until the client has
    # measured that hop's link slow enough for a compact codec to pay (protocol.session_codec)
    codec: Codec | str = AUTO
    open_timeout_s: float = 10.0
    probe_timeout_s: float = 3.0
    upgrade_timeout_s: float = 5.0  # a peer first reached through a relay: hole punching to it, at most this long
    probe_all_up_to: int = 32  # swarms with at most this many records are probed whole before each plan
    probe_sample: int = 8  # in larger ones: unmeasured peers probed per plan, besides the route's, to learn RTTs
    probe_rounds: int = 2  # in larger ones: rounds of probing, then the route is planned on peers that answered
    step_timeout_s: float = 10.0  # per step, plus step_timeout_per_token_s per token in it
    step_timeout_per_token_s: float = 0.05
    io_timeout_s: float = 30.0
    data_channel: bool = True  # take a session's steps to the node's sealed TCP channel when it offers one
    request_timeout_s: float = 300.0  # the whole generation, recoveries included
    ban_s: float = 15.0  # first ban of a failed peer; doubles on each repeat
    seed: int = 0  # for backoff jitter
    routing: str = "latency"  # "latency" (interactive chat) or "throughput" (batch jobs): mesh.routing
    head_quant: str = "none"  # the LM head on this device: "int8" reads 4x fewer bytes per token
    # spot checks (mesh.spot_check): after this share of steps (and the first and last) a second node
    # recomputes every hop's latest steps; tokens are released once checked. 0: off (it doubles the
    # swarm's compute per token and needs two nodes per span with the same quantization)
    verify_rate: float = 0.0
    verify_tolerance: float = DEFAULT_TOLERANCE  # relative RMS per token row; docs/security.md
    # the first blocks run here (mesh.first_blocks): a count, or "auto" (one when memory allows); the
    # commands default to "auto", the library to 0
    local_blocks: int | str = 0
    local_quant: str = "auto"  # how the local blocks are loaded ("auto": as the model's own weights, as nodes do)
    trusted_peers: frozenset[str] | None = None  # route (and spot-check) only through these node peer ids
    swarm_secret: SwarmSecret | None = None  # household mode: only nodes proving this secret (mesh.swarm_secret)
    # speculative decoding (mesh.speculative): drafts from prompt lookup checked up to `max_drafts` at
    # a time in one pass; the output is the same as without it (off with spot checks, which check steps)
    speculative: bool = False
    max_drafts: int = DEFAULT_MAX_DRAFTS
    draft_model: str | Path | None = None  # drafts from this small model sharing the tokenizer (mesh.draft_model)
    # prefix reuse (mesh.kept_sessions): a finished generation's route stays open this long, and a
    # request starting with its tokens prefills only the rest (0: off); at most `max_kept_routes`
    keep_sessions_s: float = 0.0
    max_kept_routes: int = DEFAULT_MAX_ROUTES

    def __post_init__(self):
        if self.codec != AUTO and not isinstance(self.codec, Codec):
            raise InvalidInput(f"codec {self.codec!r} is not a protocol.Codec or {AUTO!r}")
        if self.routing not in ROUTING_MODES:
            raise InvalidInput(f"routing mode {self.routing!r} is not one of {', '.join(ROUTING_MODES)}")
        if not 0 <= self.verify_rate <= 1:
            raise InvalidInput(f"verify rate must be in [0, 1] (0: off), got {self.verify_rate}")
        if not self.verify_tolerance > 0:
            raise InvalidInput(f"verify tolerance must be positive, got {self.verify_tolerance}")
        check_local_blocks(self.local_blocks)
        if self.trusted_peers is not None and not (
                isinstance(self.trusted_peers, frozenset) and all(isinstance(p, str) for p in self.trusted_peers)):
            raise InvalidInput(f"trusted peers must be a frozenset of peer ids, got {self.trusted_peers!r}")
        if self.swarm_secret is not None and not isinstance(self.swarm_secret, SwarmSecret):
            raise InvalidInput(f"swarm secret must be a mesh.swarm_secret.SwarmSecret, got {type(self.swarm_secret)}")
        if self.draft_model is not None and not self.speculative:
            raise InvalidInput("a draft model drafts for speculation: set speculative too")
        if not 1 <= self.max_drafts <= MAX_DRAFTS:
            raise InvalidInput(f"max drafts must be in [1, {MAX_DRAFTS}], got {self.max_drafts}")
        if not self.keep_sessions_s >= 0 or self.max_kept_routes < 1:
            raise InvalidInput(f"sessions are kept for >= 0 s, at most >= 1 routes; got {self.keep_sessions_s} s, "
                               f"{self.max_kept_routes}")


@dataclass
class HopReport:
    peer_id: str
    start: int
    end: int
    compute_s: float = 0.0
    total_s: float = 0.0  # round trips including compute
    times: HopTimes = field(default_factory=HopTimes)  # where total_s went besides compute
    path: str = PathKind.DIRECT.value  # how the hop's session travelled: direct, hole-punched or relayed
    relay: str | None = None  # the relay's peer id, for a relayed hop (it saw when and how much, not what)


@dataclass
class GenerationReport:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str = "length"
    hops: list[HopReport] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    recoveries: list[Recovery] = field(default_factory=list)
    verification: VerificationReport = field(default_factory=VerificationReport)
    speculation: SpeculationReport = field(default_factory=SpeculationReport)
    local_blocks: int = 0  # blocks [0, local_blocks) ran on this device; the route covers the rest
    reused_tokens: int = 0  # prompt tokens a kept route already held (prefix reuse): not prefilled again

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_s + self.decode_s
        return len(self.token_ids) / total if total > 0 else 0.0

    @property
    def route(self) -> list[dict]:
        return [{"peer_id": h.peer_id, "start": h.start, "end": h.end} for h in self.hops]

    def route_text(self) -> str:
        """The route as a log line shows it: `here[0:1] -> 3xYz9a[1:4] -> ...` (here: the local blocks)."""
        local = [f"here[0:{self.local_blocks}]"] if self.local_blocks else []
        return " -> ".join(local + [f"{h.peer_id[-6:]}[{h.start}:{h.end}]" for h in self.hops])


class Client:
    def __init__(self, transport: Transport, discovery: Discovery, model_dir: OpenModel | str | Path, *,
                 options: ClientOptions = ClientOptions(), head: Head | None = None,
                 tokenizer: Tokenizer | None = None, drafter: Callable[[list[int]], Drafter] | None = None):
        self.transport, self.discovery, self.options = transport, discovery, options
        self.kept = KeptSessions(options.keep_sessions_s, max_routes=options.max_kept_routes)
        self._said_not_reusable = False
        opened = open_model_dir(model_dir)
        self.model_dir, self.config = opened.path, opened.config
        self.head: Head = head if head is not None else load_head(opened, quant=options.head_quant)
        self.first_blocks = None if options.local_blocks == 0 else FirstBlocks.load(
            opened, options.local_blocks, quant=options.local_quant)  # None: none (auto may find no room)
        self.tokenizer = tokenizer if tokenizer is not None else opened.tokenizer()
        # each generation's drafter, from its prompt ids (speculation): the draft model, else prompt lookup
        self.draft_model = None if options.draft_model is None else DraftModel.load(
            options.draft_model, vocab_size=self.config.vocab_size)
        if drafter is not None:
            self.drafter = drafter
        elif self.draft_model is not None:
            self.drafter = lambda prompt_ids: self.draft_model.start(self.config.max_position_embeddings)
        else:
            self.drafter = lambda prompt_ids: PromptLookup()
        self.manifest_hash = opened.digest
        self.model_id = opened.name
        # each peer's round trip as the planner weighs it: measured by the last probe; through a relay,
        # times RELAYED_RTT_FACTOR (a third party's uplink carries it, and one more machine can fail it)
        self.rtts: dict[str, float] = {}
        self._unpunched: dict[str, float] = {}  # peer -> until when hole punching to it is not tried again
        self.refusals: dict[str, str] = {}  # peer -> why it refused our last probe (an allow-list)
        self.untrusted: set[str] = set()  # peers left out of routes: off `trusted_peers`, or without the swarm's proof
        self.links = LinkBook()  # each peer's link, as probes and steps timed it (for the wire codec)
        self.bans = BanList(base_s=options.ban_s)
        self.rng = random.Random(options.seed)
        self._head_batcher = MicroBatcher(self._run_head, eager=False)  # concurrent generations' last hidden states
        self._generating = 0  # generations running now: alone, one has nobody to share the head with
        self._span_cache: dict[str, tuple[SpanInfo, ServerSpan]] = {}  # peer -> its last info seen, as planned on
        self._local_blocks = LocalBlocks(self.model_dir)  # spot checks' arbiter of last resort; loads only if used

    async def servers(self) -> list[tuple[PeerRecord, SpanInfo]]:
        """Every record of a peer serving this model that answers now, with its fresh span info."""
        return [(record, info) for record, info in await self.survey() if info is not None]

    async def survey(self, limit: int | None = None) -> list[tuple[PeerRecord, SpanInfo | None]]:
        """Every record of a peer serving this model (the first `limit` by peer id, if given), probed
        now: its fresh span info, or None for a peer that did not answer. Round trips land in `rtts`."""
        records = sorted(await self.discovery.lookup(self.manifest_hash), key=lambda r: r.peer_id)[:limit]
        probed = await self._probe_all(records)
        return [(record, probed[record.peer_id]) for record in records]

    async def _probe_all(self, records: list[PeerRecord]) -> dict[str, SpanInfo | None]:
        """Probe `records` concurrently: peer id -> fresh span info, or None for a peer that did not answer."""
        results: dict[str, SpanInfo | None] = {}

        async def probe(record: PeerRecord) -> None:
            results[record.peer_id] = await self._probe(record)

        async with trio.open_nursery() as nursery:
            for record in records:
                nursery.start_soon(probe, record)
        return results

    async def _probe(self, record: PeerRecord) -> SpanInfo | None:
        """Its fresh span info (None: it did not answer). A peer that answered through a relay is
        hole-punched to first (both ends' NATs permitting), and probed again on the direct path."""
        info = await self._probe_once(record)
        if info is not None and self.transport.path(record.peer_id) is PathKind.RELAYED \
                and await self._upgrade(record.peer_id):
            info = await self._probe_once(record)
        return info

    async def _upgrade(self, peer_id: str) -> bool:
        """Hole punching to `peer_id`, unless it failed within `UPGRADE_RETRY_S`; True when direct."""
        now = trio.current_time()
        if self._unpunched.get(peer_id, -math.inf) > now:
            return False
        try:
            with trio.move_on_after(self.options.upgrade_timeout_s):
                if await self.transport.upgrade(peer_id, timeout=self.options.upgrade_timeout_s):
                    log.info("peer %s: hole-punched to a direct connection", peer_id)
                    self._unpunched.pop(peer_id, None)
                    return True
            log.info("peer %s: no direct connection within %g s; staying on the relay", peer_id,
                     self.options.upgrade_timeout_s)
        except TransportError as err:
            log.info("peer %s: no direct connection (%s); staying on the relay", peer_id, err)
        if len(self._unpunched) > SPAN_CACHE_MAX:
            self._unpunched.clear()
        self._unpunched[peer_id] = now + UPGRADE_RETRY_S
        return False

    async def _probe_once(self, record: PeerRecord) -> SpanInfo | None:
        self.transport.add_peer_addrs(record.peer_id, list(record.addrs))
        timeout = self.options.probe_timeout_s
        try:
            with trio.fail_after(timeout):
                started = trio.current_time()
                raw = await self.transport.open_stream(record.peer_id, INFO_PROTOCOL, timeout=timeout)
                stream = MessageStream(raw, Role.CLIENT, io_timeout=timeout)
                try:  # within the probe's one deadline
                    asked = trio.current_time()
                    await stream.send_unbounded(Hello(software=CLIENT_SOFTWARE, codecs=tuple(Codec),
                                                      swarm_proof=self._proof))
                    hello = await stream.receive_unbounded()  # the node's Hello, or an Error
                    info = hello if isinstance(hello, Error) else await stream.receive_unbounded()
                finally:
                    await stream.aclose()
            relayed = self.transport.path(record.peer_id) is PathKind.RELAYED
            self.rtts[record.peer_id] = (trio.current_time() - started) * (RELAYED_RTT_FACTOR if relayed else 1.0)
            self.links.record(record.peer_id, Exchange(stream.bytes_sent + stream.bytes_received, trio.current_time() - asked))
        except (trio.TooSlowError, TransportError, ProtocolError) as err:
            log.info("peer %s does not answer: %s", record.peer_id, err)
            return None
        if len(self.refusals) > SPAN_CACHE_MAX:
            self.refusals.clear()
        if isinstance(info, Error):  # refused (not on its allow-list, say): said if no route is left
            log.info("peer %s refuses us: %s", record.peer_id, info.reason)
            self.refusals[record.peer_id] = info.reason
            return None
        self.refusals.pop(record.peer_id, None)
        if isinstance(hello, Hello) and (unproven := refusal_reason(self.options.swarm_secret, raw.peer_id,
                                                                    hello.swarm_proof)):
            log.info("not routing through %s: %s", record.peer_id, unproven)
            self._distrust(record.peer_id)
            return None
        if not isinstance(info, SpanInfo) or info.manifest_hash != self.manifest_hash:
            return None
        return info

    @property
    def _proof(self) -> bytes:
        """What our Hello carries to prove the swarm's secret (household mode), else nothing."""
        return proof_of(self.options.swarm_secret, self.transport.peer_id)

    @property
    def local_blocks(self) -> int:
        """How many first blocks this client runs itself (`mesh.first_blocks`)."""
        return 0 if self.first_blocks is None else self.first_blocks.count

    def trusts(self, peer_id: str) -> bool:
        """Whether hidden states may go to `peer_id` as far as `trusted_peers` says (the swarm
        secret's proof is checked on each Hello)."""
        trusted = self.options.trusted_peers is None or peer_id in self.options.trusted_peers
        if not trusted:
            self._distrust(peer_id)
        return trusted

    def _distrust(self, peer_id: str) -> None:
        if len(self.untrusted) > SPAN_CACHE_MAX:
            self.untrusted.clear()
        self.untrusted.add(peer_id)

    async def plan(self, start: int | None = None, end: int | None = None, *, banned: frozenset[str] = frozenset(),
                   need_tokens: int = 0) -> Route:
        """The cheapest route over peers that answer now for blocks [start, end) (by default those
        this client does not run itself: [local_blocks, n_blocks)), for a session of `need_tokens`
        positions, weighed by `options.routing`; NoRouteError names missing blocks.

        A small swarm (up to `probe_all_up_to` records) is probed whole, so every candidate's round
        trip and span are fresh. In a larger one, probing everyone for every request would cost a
        round trip per peer, so the route is planned on the announced records (round trips measured
        earlier, or the median of those for a peer never measured), then only its peers and a few
        unmeasured ones (`probe_sample`, to learn their round trips) are probed; a route peer that
        does not answer, or no longer serves what its record said, is left out and the route planned
        again. Records are older than probes (a node's load has usually grown since it announced), so
        a peer not yet probed tends to look better than one just probed, and chasing them could take
        a round trip per peer in the swarm: after `probe_rounds` rounds the route is planned on the
        peers that answered, when they cover the blocks. Each round probes at least one peer not
        probed before, so planning ends.
        """
        try:
            return await self._plan(self.local_blocks if start is None else start,
                                    self.config.num_layers if end is None else end, banned, need_tokens)
        except NoRouteError as err:
            refused = err.refused or {peer: reason for peer, reason in self.refusals.items() if peer not in banned}
            who = err.who
            if self.options.trusted_peers is not None or self.options.swarm_secret is not None:
                left_out = len(self.untrusted - banned)
                who = "no trusted peer" + (f" ({left_out} untrusted peers left out)" if left_out else "")
            if refused == err.refused and who == err.who:
                raise
            raise NoRouteError(err.start, err.end, err.missing, refused=refused, who=who) from None

    async def _plan(self, start: int, end: int, banned: frozenset[str], need_tokens: int) -> Route:
        weighed = dict(mode=ROUTING_MODES[self.options.routing], need_tokens=need_tokens)
        records = [r for r in await self.discovery.lookup(self.manifest_hash)
                   if r.peer_id not in banned and self.trusts(r.peer_id)]
        if len(records) <= self.options.probe_all_up_to:
            probed = await self._probe_all(records)
            return plan_route(self._spans(probed.items()), start, end, rtts=self.rtts, **weighed)
        spans = {span.peer_id: span for span in self._spans((r.peer_id, r.info) for r in records)}
        by_peer = {r.peer_id: r for r in records}
        rtts, probed = self._estimated_rtts(records), {}  # probed: peer -> None, in probing order
        unmeasured = [r for r in records if r.peer_id not in self.rtts]
        ask = self.rng.sample(unmeasured, min(self.options.probe_sample, len(unmeasured)))
        for rounds in itertools.count(1):
            for peer, info in (await self._probe_all(ask)).items():
                probed[peer] = None
                spans.pop(peer, None)
                spans.update((s.peer_id, s) for s in self._spans([(peer, info)]))
                rtts[peer] = self.rtts.get(peer, rtts[peer])
            if rounds >= self.options.probe_rounds:
                try:  # on fresh answers only
                    return plan_route([spans[p] for p in probed if p in spans], start, end, rtts=rtts, **weighed)
                except NoRouteError:
                    pass  # the peers that answered leave a gap: probe on
            route = plan_route(spans.values(), start, end, rtts=rtts, **weighed)
            ask = [by_peer[peer] for peer in route.peers if peer not in probed]
            if not ask:  # every peer on the route answered just now, with the span it was planned on
                return route

    async def covering(self, start: int, end: int, *, fresh: bool = False) -> list[tuple[str, str, str]]:
        """(peer id, quantization, kernels) of every peer serving blocks [start, end) of this model,
        nearest first: where spot checks find checkers (`mesh.verify`). From what planning last saw
        of each peer (no network), or with `fresh` from a discovery lookup."""
        if fresh:
            infos = []
            for record in await self.discovery.lookup(self.manifest_hash):
                self.transport.add_peer_addrs(record.peer_id, list(record.addrs))
                infos.append((record.peer_id, record.info))
        else:
            infos = [(peer, info) for peer, (info, _) in self._span_cache.items()]
        found = sorted((self.rtts.get(peer, float("inf")), peer, info.quantization, info.kernels)
                       for peer, info in infos if info.start <= start and end <= info.end and self.trusts(peer))
        return [(peer, quantization, kernels) for _, peer, quantization, kernels in found]

    def _spans(self, infos: Iterable[tuple[str, SpanInfo | None]]) -> list[ServerSpan]:
        """The planner's view of each peer's span info (a thousand per plan in a large swarm: each
        built once per announcement the client sees, not once per plan)."""
        if len(self._span_cache) > SPAN_CACHE_MAX:
            self._span_cache.clear()
        spans = []
        for peer, info in infos:
            if info is None:
                continue
            cached = self._span_cache.get(peer)
            if cached is None or cached[0] is not info:
                cached = self._span_cache[peer] = (info, ServerSpan(
                    peer, info.start, info.end, block_seconds=1.0 / max(info.throughput * (info.end - info.start), 1e-9),
                    sessions=info.sessions, free_cache_tokens=info.free_cache_tokens))
            spans.append(cached[1])
        return spans

    def _estimated_rtts(self, records: list[PeerRecord]) -> dict[str, float]:
        """Measured round trips; the median of those for peers never measured."""
        measured = sorted(self.rtts.values())
        guess = measured[len(measured) // 2] if measured else DEFAULT_RTT_S
        return {r.peer_id: self.rtts.get(r.peer_id, guess) for r in records}

    def encode_prompt(self, prompt: str | None, prompt_ids: list[int] | None, messages: list[dict] | None) -> list[int]:
        if sum(x is not None for x in (prompt, prompt_ids, messages)) != 1:
            raise InvalidInput("give exactly one of prompt, prompt_ids or messages")
        if prompt_ids is not None:
            return list(prompt_ids)
        if self.tokenizer is None:
            raise InvalidInput(f"text prompts need {TOKENIZER_FILE} in {self.model_dir}")
        text = prompt if prompt is not None else self.tokenizer.apply_chat_template(messages)
        ids = self.tokenizer.encode(text, add_special_tokens=messages is None)
        if not ids:
            raise InvalidInput("the prompt encodes to no tokens")
        return ids

    async def generate(self, prompt: str | None = None, *, prompt_ids: list[int] | None = None,
                       messages: list[dict] | None = None, params: SamplingParams = SamplingParams(),
                       report: GenerationReport | None = None) -> AsyncIterator[Emitted]:
        """Stream the tokens of one completion; `report` (if given) is filled in as it goes."""
        ids = self.encode_prompt(prompt, prompt_ids, messages)
        limit = self.config.max_position_embeddings
        if len(ids) >= limit:
            raise PromptTooLong(len(ids), limit)
        report = report if report is not None else GenerationReport(ids)
        report.prompt_ids = ids
        decoding = Decoding(params, ids, tokenizer=self.tokenizer, eos_token_ids=self.config.eos_token_ids)
        max_length = min(limit, len(ids) + params.max_new_tokens)
        await self.kept.expire()
        reuse = self.kept.take(ids, max_length) if self.options.keep_sessions_s > 0 and not self.options.verify_rate else None
        report.reused_tokens = 0 if reuse is None else reuse.position
        if reuse is not None:
            pipeline, local, room = reuse.route.pipeline, reuse.route.local, reuse.route.max_length
            pipeline.restart(trio.current_time() + self.options.request_timeout_s)
            log.info("prefix reuse: %d of the prompt's %d tokens are held by a kept route", reuse.position, len(ids))
        else:
            await self.kept.make_room(self._generating + 1)  # idle routes give way to this generation's sessions
            room = max_length if self.options.keep_sessions_s == 0 else min(limit, max(2 * max_length, KEEP_ROOM))
            pipeline = self._pipeline(room)
            local = self.first_blocks.start(room) if self.first_blocks is not None else None
        report.recoveries = pipeline.recoveries
        report.verification = VerificationReport(self.options.verify_rate)
        checks = self._spot_checks(pipeline, decoding, report.verification)
        report.speculation = SpeculationReport()
        report.local_blocks = self.local_blocks
        self._generating += 1
        completed = kept = False
        try:
            if reuse is None:
                await pipeline.open(self.local_blocks, self.config.num_layers)
            if checks is not None:
                await checks.prepare()  # checkers' sessions open beside the route's, not in the first check
            speculation = self._speculation(pipeline, ids, report.speculation, checks)
            inputs, position = ids[report.reused_tokens:], report.reused_tokens
            while True:
                started = trio.current_time()
                decode = speculation is not None and len(inputs) == 1
                draft = speculation.propose(decoding, position + 1, max_length) if decode else None
                drafted = list(draft.tokens) if draft is not None else []
                rows = await self._forward(pipeline, inputs + drafted, position, report, local,
                                           rows_from=len(inputs) - 1)
                chosen: list[Emitted] = []
                for row in range(len(drafted) + 1):  # the last input's logits, then each draft's
                    emitted = decoding.accept(await rows.logits(row))
                    chosen.append(emitted)
                    completed = emitted.finish is not None or position + len(inputs) + row >= max_length
                    if completed or row == len(drafted) or emitted.token_id != drafted[row]:
                        break
                position += len(inputs) + len(chosen) - 1
                if len(chosen) <= len(drafted):  # drafts from the first miss on: no node keeps them
                    pipeline.rewind(position)
                if decode:
                    speculation.settle(draft, len(chosen) - 1, trio.current_time() - started)
                emitted = chosen[-1]
                released = chosen if checks is None else await checks.after_step(emitted, position, last=completed)
                _account(report, trio.current_time() - started, first=position == len(ids))  # checks included
                report.token_ids = decoding.token_ids
                report.finish_reason = decoding.finish.value if decoding.finish else "length"
                report.text = decoding.text if self.tokenizer is not None else None
                if released is None:  # a liar was caught: on from the last verified step, through honest peers
                    position, inputs = checks.resume(ids)
                    completed = False
                    continue
                for verified in released:
                    yield verified
                if completed:
                    break
                inputs = [emitted.token_id]
            if self.options.keep_sessions_s > 0 and checks is None and self._reusable(pipeline, local):
                held = (ids + decoding.token_ids)[:position]
                await self.kept.put(KeptRoute(held, pipeline, local, room, 0.0))
                kept = True
        finally:
            self._generating -= 1
            self._report_service(pipeline, completed=completed)
            if checks is not None:
                await checks.aclose()
            if not kept:
                await pipeline.close()

    def _reusable(self, pipeline: RoutePipeline, local: LocalRun | None) -> bool:
        """Whether a finished route may serve a later request from its prefix with the answer a fresh
        route gives: every hop (and the local blocks) computes positions independently of the steps
        they came in (`Span.chunk_invariant`: quantized spans with the compiled kernels)."""
        if pipeline.chunk_invariant and (local is None or local.span.chunk_invariant):
            return True
        if not self._said_not_reusable:
            self._said_not_reusable = True
            log.info("prefix reuse off for routes through float spans or nodes without the compiled kernels: "
                     "their results depend on how a conversation was split into steps")
        return False

    def _speculation(self, pipeline: RoutePipeline, ids: list[int], report: SpeculationReport,
                     checks: SpotChecks | None) -> Speculation | None:
        """This generation's drafting, or None where it is off (and the report says why)."""
        if not self.options.speculative:
            return None
        if checks is not None:
            report.off_reason = "spot checks check whole steps; speculation is off with --verify-rate"
        elif not pipeline.rewinds_steps:
            report.off_reason = "a node on the route does not compute short steps row-exactly (an older version)"
        else:
            report.enabled = True
            return Speculation(self.drafter(ids), DraftLength(self.options.max_drafts), report, pipeline)
        log.info("speculation off: %s", report.off_reason)
        return None
    async def generate_text(self, prompt: str | None = None, **kwargs) -> GenerationReport:
        report = GenerationReport([])
        async for _ in self.generate(prompt, report=report, **kwargs):
            pass
        return report

    def _report_service(self, pipeline: RoutePipeline, *, completed: bool) -> None:
        """Tell the transport whose hops failed during a generation and, once it completed, who
        carried it to the end (`Transport.report_service`: a peer cache keeps the peers that served)."""
        for recovery in pipeline.recoveries:
            self.transport.report_service(recovery.failed_peer, ok=False)
        if completed:
            for peer_id in dict.fromkeys(hop.peer_id for hop in pipeline.hops):
                self.transport.report_service(peer_id, ok=True)

    def _spot_checks(self, pipeline: RoutePipeline, decoding: Decoding, report: VerificationReport) -> SpotChecks | None:
        if self.options.verify_rate == 0:
            return None
        verifier = RecomputeVerifier(self, pipeline.open_hop, banned=lambda: self.bans.banned(trio.current_time()),
                                     timeout=pipeline.step_timeout, tolerance=self.options.verify_tolerance,
                                     local=self._local_blocks)
        return SpotChecks(self.options.verify_rate, random.Random(self.rng.getrandbits(64)), verifier, pipeline,
                          decoding, report)

    def _pipeline(self, max_length: int) -> RoutePipeline:
        async def plan(start: int, end: int, banned: frozenset[str]) -> Route:
            return await self.plan(start, end, banned=banned, need_tokens=max_length)

        async def open_one(peer_id: str, start: int, end: int, codec: Codec | None) -> HopSession:
            if not self.trusts(peer_id):  # planning left it out already; a checker's list may not have
                raise HopFailed(peer_id, start, end, "not on this client's trusted peers")
            return await open_hop(
                self.transport, peer_id, start, end, model_id=self.model_id, manifest_hash=self.manifest_hash,
                max_length=max_length, batch=1, codec=self.options.codec if codec is None else codec,
                timeout=self.options.open_timeout_s, io_timeout=self.options.io_timeout_s,
                data_channel=self.options.data_channel, hidden_size=self.config.hidden_size, links=self.links,
                swarm=self.options.swarm_secret)

        timing = StepTiming(self.options.step_timeout_s, self.options.step_timeout_per_token_s)
        return RoutePipeline(plan, open_one, deadline=trio.current_time() + self.options.request_timeout_s,
                             rng=self.rng, bans=self.bans, timing=timing)

    async def _forward(self, pipeline: RoutePipeline, ids: list[int], position: int, report: GenerationReport,
                       local: LocalRun | None = None, *, rows_from: int = -1) -> RowLogits:
        """`ids` at `position` through the local blocks and the route: the logits of its positions
        from `rows_from` on (by default the last; drafts: the last input's and every draft's)."""
        hidden = self.head.embed_tokens(ids)
        if local is not None:  # blocks [0, K) here: what leaves the device is their output
            hidden = await local.run(hidden, position)
        hidden = await pipeline.forward(hidden, position)
        report.hops = _hop_reports(pipeline.hops)
        return RowLogits(self, hidden[0, rows_from:])

    async def _logits(self, last: np.ndarray) -> np.ndarray:
        """The LM head on one sequence's last hidden state [1, D] -> logits [V]. Concurrent
        generations (an API server's users) share one pass where the head computes rows
        independently (`Head.batch_rows`): whoever holds the lock next runs every row queued by
        then (`mesh.batcher`), reading the head once."""
        rows = self.head.batch_rows
        if rows <= 1 or (self._generating == 1 and not self._head_batcher.queue):
            return self.head.next_logits(last)[0]  # nobody to share a pass with
        return await self._head_batcher.submit(Job(last, key=None, rows=1, max_rows=rows))

    async def _run_head(self, jobs: list[Job]) -> None:
        for job, logits in zip(jobs, self.head.next_logits(np.concatenate([job.payload for job in jobs]))):
            job.output = logits

    async def aclose(self) -> None:
        """Close the routes kept for prefix reuse."""
        await self.kept.close_all()


class RowLogits:
    """The logits of a step's positions, computed when first asked: all rows in one pass of the head
    where its rows are exact together (`Head.batch_rows`), else row by row (a float head's GEMM
    rounds with the row count), so each is the logits a one-token step gives."""

    def __init__(self, client: Client, hidden: np.ndarray):
        self.client, self.hidden = client, hidden  # [rows, D]
        self._all: np.ndarray | None = None

    async def logits(self, row: int) -> np.ndarray:
        if len(self.hidden) == 1 or self.client.head.batch_rows < len(self.hidden):
            return await self.client._logits(self.hidden[row : row + 1])
        if self._all is None:
            self._all = self.client.head.next_logits(self.hidden)
        return self._all[row]


def _hop_reports(hops: list[HopSession]) -> list[HopReport]:
    return [HopReport(h.peer_id, h.start, h.end, h.compute_seconds, h.wall_seconds, replace(h.times), h.path.value, h.relay)
            for h in hops]


def _account(report: GenerationReport, seconds: float, *, first: bool) -> None:
    if first:
        report.prefill_s += seconds
    else:
        report.decode_s += seconds
