"""Speculative decoding across the route: several drafted tokens checked in one pass.

In a pipeline every token costs one pass through every hop: each hop reads its weights and adds a
round trip. A client that guesses the next tokens sends the last token and k drafts as one step,
reads the logits at every position, and keeps the drafts the model agrees with: one pass, up to
k + 1 tokens.

- **Drafts** come from the client's side. `PromptLookup` matches the text's last few tokens
  against earlier text (the prompt and the answer so far) and proposes what followed there: free,
  and strong where answers repeat their prompt (code edits, quoting, summaries with names).
  Drafts are always deterministic guesses.
- **Acceptance** (`mesh.client.Client.generate`): the generation's own `Decoding` chooses a token
  from the logits of each position in turn, exactly as one-token steps would; a draft is kept while
  it equals the chosen token. With greedy decoding that is the longest agreeing prefix. With
  sampling it is the standard speculative-sampling rule for a draft distribution that puts all its
  mass on the draft (accept with probability p(draft), else sample from p without the draft),
  done by sampling from p and comparing: the same sampler draws the same numbers, so a seeded
  generation gives the same tokens with or without speculation, also across failovers.
- **Exactness** rests on the nodes: a step of at most `shard.interfaces.ROW_EXACT_TOKENS` tokens
  computes each row with the bits a one-token step computes (capability `rewind-steps`), so the
  logits at every position are those of plain decoding. The client's head is asked row by row
  unless its rows are exact together (`Head.batch_rows`).
- **Rejected positions** leave no trace: the next step says `rewind` and starts where the kept
  tokens end; each node cuts its cache there (`node.sessions.SessionManager.check_input` checks
  it), and each hop's history keeps only the kept rows, so a failover replays the accepted
  history, which rebuilds bit-identical caches because those rows are exact on their own.
- **How many drafts** (`DraftLength`): the k that maximises the tokens a pass is expected to yield
  per second of pass, from the acceptance measured for each kind of match (a geometric model) and
  the pass times measured on this route (a fixed cost plus a cost per token, fitted over passes of
  different lengths). Where drafts never
  match, k falls to 0 and a pass costs what it did without speculation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from shard.generate import Decoding
from shard.interfaces import ROW_EXACT_TOKENS

MAX_DRAFTS = ROW_EXACT_TOKENS - 1  # the last token and its drafts fit one row-exact step
DEFAULT_MAX_DRAFTS = 8
MIN_PASS_S = 1e-6  # a pass's time is taken as at least this (a clock too coarse to time it)
PRIOR_TOKEN_SHARE = 1 / 16  # of a pass, a token's cost where the passes measured cannot tell
PROBE_EVERY = 16  # a source whose drafts are not worth sending is still tried with one draft this often


@dataclass(frozen=True)
class Draft:
    tokens: tuple[int, ...]
    source: str  # what found them ("lookup-3": a match of the last 3 tokens), for acceptance statistics


class Drafter(Protocol):
    """Guesses the tokens that follow `context` (the prompt and the tokens chosen so far)."""

    def draft(self, context: Sequence[int], limit: int) -> Draft | None: ...


class PromptLookup:
    """Drafts by n-gram lookup: the tokens that followed the latest earlier occurrence of the
    context's last n tokens (n from `max_ngram` down to `min_ngram`). The n-grams are indexed as
    the context grows, so a draft costs a few dictionary lookups, not a scan of the context."""

    def __init__(self, *, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min <= max, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._ends: dict[tuple[int, ...], int] = {}  # n-gram -> the latest end of it with a token after it
        self._indexed = 0  # ends below this are in `_ends`
        self._context: list[int] = []

    def draft(self, context: Sequence[int], limit: int) -> Draft | None:
        if limit <= 0:
            return None
        self._index(context)
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            end = self._ends.get(tuple(context[len(context) - n:]))
            if end is not None:
                return Draft(tuple(context[end:end + limit]), f"lookup-{n}")
        return None

    def _index(self, context: Sequence[int]) -> None:
        if self._context != list(context[:len(self._context)]):  # another sequence (not an extension)
            self._ends, self._indexed = {}, 0
        for end in range(max(self._indexed, 1), len(context)):  # the n-grams ending before position `end`
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self._ends[tuple(context[end - n:end])] = end
        self._indexed = max(self._indexed, len(context))
        self._context = list(context)


@dataclass
class _Acceptance:
    """A source's drafts kept per draft checked, with a prior of `prior_kept` in `prior_checked`."""

    kept: float = 1.0
    checked: float = 2.0

    @property
    def rate(self) -> float:
        return self.kept / self.checked

    def add(self, kept: int, checked: int, decay: float) -> None:
        self.kept = self.kept * decay + kept
        self.checked = self.checked * decay + checked


class DraftLength:
    """How many drafts to send with a token: the k maximising expected tokens per second of a pass.

    A pass with k drafts, each kept with probability a (per source, measured) until the first
    miss, yields (1 - a^(k+1)) / (1 - a) tokens on average and costs `fixed + per_token * (k + 1)`
    seconds (both fitted to the passes measured on this route, `_PassCost`). Returns 0 where a draft is not worth its rows (but 1 every `PROBE_EVERY` such times).
    """

    def __init__(self, max_drafts: int = DEFAULT_MAX_DRAFTS, *, decay: float = 0.9):
        if not 0 <= max_drafts <= MAX_DRAFTS:
            raise ValueError(f"max drafts must be in [0, {MAX_DRAFTS}], got {max_drafts}")
        self.max_drafts, self.decay = max_drafts, decay
        self._acceptance: dict[str, _Acceptance] = {}
        self._skipped: dict[str, int] = {}  # source -> drafts found and not sent
        self._passes = _PassCost(decay)

    def choose(self, draft: Draft | None) -> int:
        if draft is None or not draft.tokens or self.max_drafts == 0:
            return 0
        rate = self._acceptance.get(draft.source, _Acceptance()).rate
        fixed, per_token = self._passes.estimate()
        best, best_rate = 0, 1.0 / (fixed + per_token)
        expected = 1.0
        for k in range(1, min(self.max_drafts, len(draft.tokens)) + 1):
            expected += rate**k
            tokens_per_s = expected / (fixed + per_token * (k + 1))
            if tokens_per_s > best_rate:
                best, best_rate = k, tokens_per_s
        if best == 0:  # not worth it now; one draft now and then, so a source that improves is noticed
            skipped = self._skipped[draft.source] = self._skipped.get(draft.source, 0) + 1
            return 1 if skipped % PROBE_EVERY == 0 else 0
        return best

    def observe_pass(self, tokens: int, seconds: float) -> None:
        """A decode pass of `tokens` positions took `seconds` (round trips and compute)."""
        self._passes.add(tokens, seconds)

    @property
    def pass_cost(self) -> tuple[float, float]:
        """(seconds of a pass's fixed part, seconds per token in it) as measured so far."""
        return self._passes.estimate()

    def observe_drafts(self, source: str, sent: int, kept: int) -> None:
        """Of `sent` drafts from `source`, the first `kept` were accepted (checked: kept + 1 unless all were)."""
        checked = kept + (1 if kept < sent else 0)
        self._acceptance.setdefault(source, _Acceptance()).add(kept, checked, self.decay)


class _PassCost:
    """A pass's seconds as `fixed + per_token * tokens`, fitted by least squares over the passes
    seen, recent ones weighing more (`decay` per pass). Passes of one length alone cannot separate
    the two: then a token is taken to cost `PRIOR_TOKEN_SHARE` of the mean pass."""

    def __init__(self, decay: float):
        self.decay = decay
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self._w, self._x, self._y = self._w * d + 1, self._x * d + tokens, self._y * d + seconds
        self._xx, self._xy = self._xx * d + tokens * tokens, self._xy * d + tokens * seconds

    def estimate(self) -> tuple[float, float]:
        if self._w == 0:
            return 1.0, PRIOR_TOKEN_SHARE  # nothing measured: only the ratio matters
        mean_x, mean_y = self._x / self._w, self._y / self._w
        variance = self._xx / self._w - mean_x * mean_x
        if variance > 0.25:  # lengths differ enough to read a slope
            slope = max(0.0, (self._xy / self._w - mean_x * mean_y) / variance)
        else:
            slope = PRIOR_TOKEN_SHARE * mean_y / max(mean_x, 1.0)
        return max(mean_y - slope * mean_x, MIN_PASS_S), slope


@dataclass
class SpeculationReport:
    """What speculation did in one generation (`hearth generate --json`: `speculation`)."""

    enabled: bool = False
    passes: int = 0  # decode passes through the route
    drafted: int = 0  # drafts sent
    accepted: int = 0  # drafts kept
    off_reason: str = ""  # why it was off or stopped, if it was
    sources: dict[str, list[int]] = field(default_factory=dict)  # source -> [drafted, accepted]

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def add(self, source: str, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        counts = self.sources.setdefault(source, [0, 0])
        counts[0] += drafted
        counts[1] += accepted

    def to_json(self) -> dict:
        return {"enabled": self.enabled, "passes": self.passes, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance": round(self.acceptance, 4), "off_reason": self.off_reason,
                "sources": {k: {"drafted": v[0], "accepted": v[1]} for k, v in sorted(self.sources.items())}}

    def summary(self) -> str:
        if not self.enabled:
            return f"speculation off{': ' + self.off_reason if self.off_reason else ''}"
        return (f"speculation: {self.accepted}/{self.drafted} drafts kept ({self.acceptance:.0%}) "
                f"in {self.passes} passes")


class Speculation:
    """One generation's drafting (`mesh.client.Client.generate`): drafts for the next step, sized by
    `DraftLength`, and what was kept, learned from."""

    def __init__(self, drafter: Drafter, lengths: DraftLength, report: SpeculationReport, route: Route):
        self.drafter, self.lengths, self.report, self.route = drafter, lengths, report, route

    def propose(self, decoding: Decoding, position: int, max_length: int) -> Draft | None:
        """Drafts to send after the last chosen token, whose position is `position - 1`: within the
        session's `max_length` positions and the tokens still wanted; None for none."""
        if not self.route.rewinds_steps:  # a replacement of an older version joined the route
            self.report.off_reason = "a node on the route does not compute short steps row-exactly (an older version)"
            return None
        wanted = decoding.params.max_new_tokens - len(decoding.token_ids) - 1  # the pass gives one more
        limit = min(max_length - position, wanted, self.lengths.max_drafts)
        draft = self.drafter.draft(decoding.prompt_ids + decoding.token_ids, limit) if limit > 0 else None
        k = self.lengths.choose(draft)
        return Draft(draft.tokens[:k], draft.source) if k > 0 else None

    def settle(self, draft: Draft | None, kept: int, seconds: float) -> None:
        """A decode pass with `draft` took `seconds`, and its first `kept` drafts were accepted."""
        self.report.passes += 1
        sent = len(draft.tokens) if draft is not None else 0
        self.lengths.observe_pass(sent + 1, seconds)
        if draft is not None:
            self.report.add(draft.source, sent, kept)
            self.lengths.observe_drafts(draft.source, sent, kept)


class Route(Protocol):
    @property
    def rewinds_steps(self) -> bool: ...
