"""Turning logits into a stream of tokens and text for one sequence, wherever the logits come from.

`Decoding` is the per-sequence state (sampler, stop rules, streaming detokenizer, ids so far). The
local loop `generate_local` drives it with a `LocalPipeline`; the networked client drives the same
object with logits computed across peers, so both produce identical tokens for the same inputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from shard.errors import PromptTooLong
from shard.pipeline import LocalPipeline
from shard.sampling import FinishReason, Sampler, SamplerState, SamplingParams, StopChecker
from shard.tokenizer import Tokenizer


@dataclass
class Emitted:
    token_id: int
    text: str  # text this token makes visible ("" while a stop string might be starting)
    finish: FinishReason | None


class Decoding:
    """One sequence being generated: feed it the logits of its last position, get the next token."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], *, tokenizer: Tokenizer | None = None,
                 eos_token_ids: tuple[int, ...] = ()):
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.token_ids: list[int] = []
        self.text = ""
        self.sampler = Sampler(params)
        self._tokenizer = tokenizer
        self._eos = tokenizer.eos_token_ids if tokenizer is not None else eos_token_ids
        self.stops = self._new_stops()

    def _new_stops(self) -> StopChecker:
        detokenizer = self._tokenizer.incremental_decoder() if self._tokenizer is not None else None
        return StopChecker(self.params, self._eos, detokenizer=detokenizer)

    @property
    def finish(self) -> FinishReason | None:
        return self.stops.finish

    def accept(self, logits: torch.Tensor | np.ndarray) -> Emitted:
        # logits: [V] of the sequence's last position (a tensor, or an array from `Head.next_logits`)
        scores = torch.from_numpy(logits) if isinstance(logits, np.ndarray) else logits
        token = self.sampler.sample(scores.unsqueeze(0), [self.prompt_ids + self.token_ids])[0]
        self.token_ids.append(token)
        step = self.stops.step(token, None if self.stops.detokenizer is not None else "")
        self.text += step.text
        return Emitted(token, step.text, step.finish)

    def checkpoint(self) -> DecodingCheckpoint:
        """Where this sequence is now, for `rewind`."""
        return DecodingCheckpoint(len(self.token_ids), self.sampler.state())

    def rewind(self, checkpoint: DecodingCheckpoint) -> None:
        """Forget the tokens chosen since `checkpoint` (their logits were found wrong, say): the
        sampler goes back to its state then, the stop rules and text are rebuilt from the tokens kept."""
        if checkpoint.n_tokens > len(self.token_ids):
            raise ValueError(f"checkpoint at {checkpoint.n_tokens} tokens is ahead of this sequence's {len(self.token_ids)}")
        del self.token_ids[checkpoint.n_tokens:]
        self.sampler.set_state(checkpoint.sampler)
        self.stops, self.text = self._new_stops(), ""
        for token in self.token_ids:
            self.text += self.stops.step(token, None if self.stops.detokenizer is not None else "").text


@dataclass(frozen=True)
class DecodingCheckpoint:
    n_tokens: int  # tokens chosen by then
    sampler: SamplerState


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str
    prefill_s: float
    decode_s: float
    timings: list[float] = field(default_factory=list)  # seconds per generated token

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_s + self.decode_s
        return len(self.token_ids) / total if total > 0 else 0.0


def generate_local(pipeline: LocalPipeline, prompt_ids: list[int], params: SamplingParams, *,
                   tokenizer: Tokenizer | None = None,
                   on_token: Callable[[Emitted], None] | None = None) -> GenerationResult:
    """Generate one sequence in this process; `on_token` sees each token as it is chosen."""
    limit = pipeline.config.max_position_embeddings
    if len(prompt_ids) >= limit:
        raise PromptTooLong(len(prompt_ids), limit)
    decoding = Decoding(params, prompt_ids, tokenizer=tokenizer, eos_token_ids=pipeline.config.eos_token_ids)
    pipeline.start(batch=1, max_length=min(limit, len(prompt_ids) + params.max_new_tokens))
    started = time.perf_counter()
    logits = pipeline.forward(torch.tensor([prompt_ids]))
    timings = []
    while True:
        emitted = decoding.accept(logits[0])
        now = time.perf_counter()
        timings.append(now - started)
        if on_token is not None:
            on_token(emitted)
        if emitted.finish is not None or pipeline.length >= limit:
            break
        started = now
        logits = pipeline.forward(torch.tensor([[emitted.token_id]]))
    return GenerationResult(
        prompt_ids=list(prompt_ids), token_ids=decoding.token_ids,
        text=decoding.text if tokenizer is not None else None,
        finish_reason=(decoding.finish or FinishReason.LENGTH).value,
        prefill_s=timings[0], decode_s=sum(timings[1:]), timings=timings,
    )
