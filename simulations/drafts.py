"""Drafts for simulated users: a stand-in for prompt lookup on a workload whose answer repeats its prompt.

A real drafter (`mesh.speculative.PromptLookup`) needs text that repeats itself; the stand-in
model's tokens do not. `ReferenceDrafter` knows the stand-in model's true greedy continuation of
whatever context it is given (computed incrementally from `StandInWeights`, as `reference_tokens`
does) and proposes `limit` tokens of it, each right with probability `acceptance` until the first
wrong one; from there every drafted token is wrong, as the text a lookup copies diverges from the
answer (so the rows after a miss are paid for, as with real drafts). A scenario sets the acceptance
measured for prompt lookup on real models (code edits), without a real model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from mesh.speculative import Draft
from simulations.compute import StandInWeights

SOURCE = "reference"


class ReferenceDrafter:
    """Drafts of the stand-in model's greedy continuation of the context, right with probability
    `acceptance` each (`mesh.speculative.Drafter`). Holds the running sums of the context it has
    seen and of the continuation it has computed, so a draft costs the new positions only."""

    def __init__(self, weights: StandInWeights, blocks: int, *, acceptance: float, rng: random.Random):
        if not 0 <= acceptance <= 1:
            raise ValueError(f"acceptance must be in [0, 1], got {acceptance}")
        self.weights, self.blocks, self.acceptance, self.rng = weights, blocks, acceptance, rng
        self._tokens: list[int] = []  # the context seen so far, then its greedy continuation
        self._sums = [0.0] * blocks  # the running sums after every position of `_tokens`
        self._next: int | None = None  # the greedy token after `_tokens`

    def draft(self, context: Sequence[int], limit: int) -> Draft | None:
        if limit <= 0 or not context:
            return None
        self._follow(context)
        while len(self._tokens) < len(context) + limit:
            self._feed(self._next)
        truth = self._tokens[len(context):len(context) + limit]
        drafted, missed = [], False
        for token in truth:  # after the first wrong guess the rest is wrong too, as a lookup's text diverges
            missed = missed or self.rng.random() >= self.acceptance
            drafted.append((token + 1 + self.rng.randrange(self.weights.vocab - 1)) % self.weights.vocab
                           if missed else token)
        return Draft(tuple(drafted), SOURCE)

    def _follow(self, context: Sequence[int]) -> None:
        """Make `context` the start of `_tokens`: kept where it is (the chosen tokens were the true
        ones), recomputed from the start where it is not."""
        known = self._tokens[:len(context)]
        if len(known) == len(context) and known == list(context):
            return
        if known != list(context[:len(known)]) or len(self._tokens) > len(context):
            self._tokens, self._sums, self._next = [], [0.0] * self.blocks, None
        for token in context[len(self._tokens):]:
            self._feed(token)

    def _feed(self, token: int) -> None:
        position = len(self._tokens)
        last = self.weights.blocks_one_position(0, self.weights.embed_rows[token % self.weights.vocab], self._sums,
                                                position)
        self._tokens.append(token)
        self._next = self.weights.token(last)
