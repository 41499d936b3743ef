"""Choosing the next token from logits, and deciding when a sequence is done.

Owns `SamplingParams` (validated once, on construction), `Sampler` (repetition penalty,
temperature, top-k, top-p with Hugging Face semantics, then greedy argmax or a seeded draw) and
`StopChecker` (stop token ids, stop strings on decoded text, `max_new_tokens`).

Randomness: a `Sampler` owns one seeded `torch.Generator`. A sampling step draws exactly one
float64 uniform per sequence (row), in row order, and turns it into a token by inverse-CDF over
the processed distribution; greedy steps draw nothing. So a run is reproducible from the seed and
the logits, and `state()`/`set_state()` let a client restore the sampler to any earlier step
(after a failover, say) and draw the same tokens again.
"""

from __future__ import annotations

import enum
import math
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from shard.errors import InvalidSamplingParams, SamplingError

_MAX_SEED = 2**63  # exclusive; fits msgpack's int64 and torch.manual_seed


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSamplingParams(name, value, "must be an integer")
    if value < minimum:
        raise InvalidSamplingParams(name, value, f"must be >= {minimum}")


def _check_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidSamplingParams(name, value, "must be a number")
    if not math.isfinite(value):
        raise InvalidSamplingParams(name, value, "must be finite")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature == 0` is greedy; `top_k == 0` and `top_p == 1` are off."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, 1)
        _check_int("top_k", self.top_k, 0)
        if _check_float("temperature", self.temperature) < 0:
            raise InvalidSamplingParams("temperature", self.temperature, "must be >= 0 (0 = greedy)")
        if not 0 < _check_float("top_p", self.top_p) <= 1:
            raise InvalidSamplingParams("top_p", self.top_p, "must be in (0, 1]")
        if _check_float("repetition_penalty", self.repetition_penalty) <= 0:
            raise InvalidSamplingParams("repetition_penalty", self.repetition_penalty, "must be > 0")
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
            if self.seed >= _MAX_SEED:
                raise InvalidSamplingParams("seed", self.seed, "must be < 2**63")
        self._validate_stops()

    def _validate_stops(self) -> None:
        for name in ("stop_token_ids", "stop_strings"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                raise InvalidSamplingParams(name, value, "must be a sequence")
            object.__setattr__(self, name, tuple(value))  # lists from JSON/CLI become tuples
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, 0)
        for text in self.stop_strings:
            if not isinstance(text, str) or not text:
                raise InvalidSamplingParams("stop_strings", text, "must be a non-empty string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class SamplerState:
    """Everything needed to put a `Sampler` back where it was: its seed and generator state."""

    seed: int
    draws: int  # uniforms drawn so far (one per sequence per sampling step)
    generator: bytes


class Sampler:
    """Turns a batch of logits into one token per sequence, following `SamplingParams`."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.draws = 0
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.seed)

    def state(self) -> SamplerState:
        return SamplerState(self.seed, self.draws, bytes(self._generator.get_state().numpy()))

    def set_state(self, state: SamplerState) -> None:
        if state.seed != self.seed:
            raise SamplingError(f"sampler state has seed {state.seed}, this sampler has {self.seed}")
        self._generator.set_state(torch.frombuffer(bytearray(state.generator), dtype=torch.uint8))
        self.draws = state.draws

    def process(self, logits: torch.Tensor, previous_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """The scores the token is picked from: [B, V] fp32, filtered entries set to -inf.

        Greedy applies only the repetition penalty (as transformers does without `do_sample`).
        """
        scores = _checked_logits(logits, previous_ids)
        p = self.params
        if p.repetition_penalty != 1.0:
            scores = apply_repetition_penalty(scores, previous_ids, p.repetition_penalty)
        if p.greedy:
            return scores
        if p.temperature != 1.0:
            scores = scores / p.temperature
        if p.top_k > 0:
            scores = apply_top_k(scores, p.top_k)
        if p.top_p < 1.0:
            scores = apply_top_p(scores, p.top_p)
        return scores

    def sample(self, logits: torch.Tensor, previous_ids: Sequence[Sequence[int]]) -> list[int]:
        """One token per row of `logits` ([B, V]); `previous_ids[b]` are row b's ids so far."""
        scores = self.process(logits, previous_ids)  # [B, V]
        if self.params.greedy:
            return scores.argmax(dim=-1).tolist()
        probs = torch.softmax(scores, dim=-1)  # [B, V] fp32
        if torch.isnan(probs).any():  # logits / a tiny temperature overflowed to inf
            raise SamplingError(f"temperature {self.params.temperature} overflows these logits")
        uniforms = torch.rand(probs.shape[0], dtype=torch.float64, generator=self._generator)
        self.draws += probs.shape[0]
        return _inverse_cdf(probs, uniforms).tolist()


def _checked_logits(logits: object, previous_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise SamplingError(f"logits must be a floating [batch, vocab] tensor, got {shape}")
    if len(previous_ids) != logits.shape[0]:
        raise SamplingError(
            f"logits have {logits.shape[0]} rows but previous_ids has {len(previous_ids)} sequences"
        )
    if logits.shape[1] == 0:
        raise SamplingError("logits have an empty vocabulary dimension")
    scores = logits.detach()
    if scores.dtype != torch.float32 or scores.device.type != "cpu":
        scores = scores.to(device="cpu", dtype=torch.float32)
    if math.isfinite(scores.sum().item()):  # the usual case, in one pass: a NaN or an inf anywhere makes the sum one
        return scores
    bad = torch.isnan(scores).any(dim=-1) | torch.isposinf(scores).any(dim=-1)
    bad |= torch.isneginf(scores).all(dim=-1)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise SamplingError(f"logits rows {rows} contain NaN or +inf, or are all -inf")
    return scores


def apply_repetition_penalty(
    scores: torch.Tensor, previous_ids: Sequence[Sequence[int]], penalty: float
) -> torch.Tensor:
    """Divide positive / multiply negative scores of already-seen tokens by `penalty` (CTRL, HF)."""
    batch, vocab = scores.shape  # scores: [B, V]
    seen = torch.zeros((batch, vocab), dtype=torch.bool)
    for row, ids in enumerate(previous_ids):
        if not ids:
            continue
        index = torch.as_tensor(list(ids), dtype=torch.long)
        if index.min() < 0 or index.max() >= vocab:
            bad = [i for i in ids if not 0 <= i < vocab][0]
            raise SamplingError(f"previous token id {bad} in sequence {row} is outside vocab of {vocab}")
        seen[row, index] = True
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def apply_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` highest scores per row (ties with the k-th are kept), -inf the rest."""
    k = min(max(top_k, 1), scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1, None]  # [B, 1]
    return scores.masked_fill(scores < kth, -math.inf)


def apply_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of top tokens whose probability reaches `top_p` (at least one)."""
    sorted_scores, sorted_index = torch.sort(scores, descending=False)  # ascending, [B, V]
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = cumulative <= (1 - top_p)
    sorted_remove[..., -1:] = False  # the most likely token always stays
    remove = sorted_remove.scatter(1, sorted_index, sorted_remove)
    return scores.masked_fill(remove, -math.inf)


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index of the first token whose cumulative probability exceeds `u * total`, per row.

    probs: [B, V] fp32 (rows sum to ~1), uniforms: [B] float64 in [0, 1). Never returns a token of
    probability zero: rounding past the last bucket falls back to the last nonzero token.
    """
    cdf = probs.double().cumsum(dim=-1)  # [B, V]
    target = (uniforms * cdf[:, -1]).unsqueeze(-1)  # [B, 1]
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # [B]
    nonzero_from_end = torch.flip(probs > 0, dims=(-1,)).int().argmax(dim=-1)
    last_nonzero = probs.shape[-1] - 1 - nonzero_from_end
    return torch.minimum(index, last_nonzero)


class FinishReason(enum.Enum):
    STOP_TOKEN = "stop_token"  # an eos or stop token id was generated
    STOP_STRING = "stop_string"  # the decoded text contains a stop string
    LENGTH = "length"  # max_new_tokens reached


@dataclass(frozen=True)
class StopStep:
    """What one generated token adds to the visible text, and whether the sequence is done."""

    text: str
    finish: FinishReason | None = None

    @property
    def done(self) -> bool:
        return self.finish is not None


class TextDecoder(Protocol):
    """A streaming detokenizer, as `shard.tokenizer.IncrementalDecoder`."""

    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class StopChecker:
    """Decides, token by token, when one sequence is done and which text may be shown.

    Give it a `detokenizer` (an `IncrementalDecoder`) and feed it token ids, or feed each token
    with the text it added. Text that could be the start of a stop string is held back until it
    is known not to be; a stop string (found even when split across tokens) is cut from the text
    together with everything after it. A stop or eos token ends the sequence and its own text is
    not shown. When the sequence ends, the text still held back (here, and in the detokenizer) is
    released, cut at a stop string if it completes one.
    """

    def __init__(
        self,
        params: SamplingParams,
        eos_token_ids: Iterable[int] = (),
        detokenizer: TextDecoder | None = None,
    ):
        self.params = params
        self.stop_ids = frozenset(eos_token_ids) | frozenset(params.stop_token_ids)
        self.detokenizer = detokenizer
        self.n_tokens = 0
        self.finish: FinishReason | None = None
        self._held = ""

    def step(self, token_id: int, text: str | None = None) -> StopStep:
        """Account for one generated token; `text` is its delta when there is no detokenizer."""
        if self.finish is not None:
            raise SamplingError(f"sequence already finished ({self.finish.value}); got token {token_id}")
        if (text is None) == (self.detokenizer is None):
            raise SamplingError("pass a token's text exactly when the StopChecker has no detokenizer")
        self.n_tokens += 1
        if token_id in self.stop_ids:
            return self._end(FinishReason.STOP_TOKEN, self.flush())
        if self.detokenizer is not None:
            text = self.detokenizer.push(token_id)
        buffer, self._held = self._held + text, ""
        if self.n_tokens >= self.params.max_new_tokens:
            return self._end(FinishReason.LENGTH, buffer + self.flush())
        cut = _first_stop(buffer, self.params.stop_strings)
        if cut is not None:
            return self._end(FinishReason.STOP_STRING, buffer[:cut])
        keep = _partial_stop_suffix(buffer, self.params.stop_strings)
        self._held = buffer[len(buffer) - keep :]
        return StopStep(buffer[: len(buffer) - keep])

    def flush(self) -> str:
        """Release held-back text (also call this when ending the sequence for other reasons)."""
        held, self._held = self._held, ""
        if self.detokenizer is not None:
            held += self.detokenizer.flush()
        return held

    def _end(self, reason: FinishReason, text: str) -> StopStep:
        """Finish with `reason`, unless `text` (held + final) completes a stop string first."""
        cut = _first_stop(text, self.params.stop_strings)
        if cut is not None:
            text, reason = text[:cut], FinishReason.STOP_STRING
        self.finish = reason
        return StopStep(text, reason)


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _partial_stop_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
