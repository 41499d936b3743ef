"""Drafts from a small model on the client's device (`--draft-model`), for speculative decoding.

A draft model shares the target model's tokenizer (its vocabulary is checked) and runs whole on
this device: `DraftModel` holds its head and blocks, loaded once; each generation gets a
`DraftRun` (`mesh.speculative.Drafter`) with a KV cache of its own. A draft feeds the context's
new tokens (cutting the cache back where the context is not an extension of what it saw: drafts
the target rejected), then chooses `limit` tokens greedily and forgets them again, so the cache
always holds the context itself. Its drafts are deterministic, which is what keeps speculation's
output identical to plain decoding's (`mesh.speculative`); how many are worth sending is
`DraftLength`'s to learn, the draft model's own time being part of each pass it measures.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mesh.speculative import Draft
from shard.errors import InvalidInput
from shard.head import load_head
from shard.interfaces import Cache, Head, Span
from shard.model_dir import OpenModel, open_model_dir
from shard.span import load_span

log = logging.getLogger("hearth.client")

SOURCE = "draft-model"


class DraftModel:
    def __init__(self, head: Head, span: Span, name: str):
        if span.start != 0 or span.end != span.config.num_layers:
            raise InvalidInput(f"a draft model runs whole, not blocks [{span.start}, {span.end})")
        self.head, self.span, self.name = head, span, name

    @classmethod
    def load(cls, path: str | Path | OpenModel, *, vocab_size: int, quant: str = "auto") -> DraftModel:
        """The model at `path` (a directory or GGUF file), checked to share a vocabulary of
        `vocab_size` tokens with the target model; InvalidInput naming the mismatch."""
        opened = open_model_dir(path)
        config = opened.config
        if config.vocab_size != vocab_size:
            raise InvalidInput(f"draft model {opened.path} has a vocabulary of {config.vocab_size} tokens, the model "
                               f"{vocab_size}: a draft model must share the model's tokenizer")
        model = cls(load_head(opened), load_span(opened, 0, config.num_layers, quant=quant), opened.name)
        log.info("draft model %s (%d blocks) drafts on this device", opened.name, config.num_layers)
        return model

    def start(self, max_length: int) -> DraftRun:
        """A generation's drafter, over a cache of up to `max_length` positions."""
        limit = min(max_length, self.span.config.max_position_embeddings)
        return DraftRun(self, self.span.new_cache(1, limit))


class DraftRun:
    """One generation's drafts from a `DraftModel` (`mesh.speculative.Drafter`)."""

    def __init__(self, model: DraftModel, cache: Cache):
        self.model, self.cache = model, cache
        self._fed: list[int] = []  # the tokens the cache holds
        self._last: np.ndarray | None = None  # the draft model's hidden state after the last of them

    def draft(self, context: Sequence[int], limit: int) -> Draft | None:
        limit = min(limit, self.cache.max_length - len(context))
        if limit <= 0 or not context:
            return None
        self._follow(context)
        head, tokens, last = self.model.head, [], self._last
        for _ in range(limit):
            token = int(np.argmax(head.next_logits(last)[0]))
            tokens.append(token)
            if len(tokens) < limit:
                last = self.model.span.run(head.embed_tokens([token]), self.cache)[:, -1]
        self.cache.truncate(len(self._fed))  # the drafted positions are forgotten
        return Draft(tuple(tokens), SOURCE)

    def _follow(self, context: Sequence[int]) -> None:
        """Make the cache hold exactly `context`: cut back to what it shares with it, feed the rest."""
        common = 0
        for held, wanted in zip(self._fed, context):
            if held != wanted:
                break
            common += 1
        if common == len(context) == len(self._fed) and self._last is not None:
            return
        if common == len(context):  # the context is a prefix of what was fed: recompute its last position
            common -= 1
        self.cache.truncate(common)
        del self._fed[common:]
        new = list(context[common:])
        self._last = self.model.span.run(self.model.head.embed_tokens(new), self.cache)[:, -1]
        self._fed.extend(new)
