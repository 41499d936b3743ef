"""Attacks a first hop can mount on what it receives, to measure what local blocks protect.

The first hop of a route receives, for every prompt token, the hidden state after the client's K
local blocks (`mesh.first_blocks`), through the wire codec. The attacker holds the same checkpoint
(every node does). Attacks, weakest first:

- **lookup** (`lookup_attack`): the nearest row of the embedding table (L2 or cosine). Exact at
  K = 0: that is the attack the README's old "token ids never leave the device" fell to.
- **single-token** (`single_token_table`, then `lookup_attack` on it): the attacker runs blocks
  [0, K) on every vocabulary token alone (at any position: alone, a token attends only to itself,
  so rotary positions cancel) and takes the nearest of those V outputs. One batch of V rows through
  K blocks, once per model.
- **linear inverter** (`fit_linear_inverter`): a least-squares map from hidden states after K blocks
  back to embeddings, fitted on text the attacker runs through its own blocks, then the lookup. A
  cheap stand-in for the "small trained inverter" of the literature.
- **search** (`search_attack`): position by position, with the prefix recovered so far, the
  attacker runs each candidate token through blocks [0, K) exactly as the client did and takes the
  one whose output is nearest. The right token's output differs from what was received only by
  the codec's rounding, so over the whole vocabulary this recovers every token the codec leaves
  distinguishable. To save compute it tries shortlists first (the nearest candidates of the
  cheaper attacks, `nearest_rows`) and searches the whole vocabulary only where none of them is
  close (`WIDEN_ABOVE`).

Shared by benchmarks/bench_privacy.py and tests/mesh/test_first_blocks.py. Arrays are float32
numpy; `span` is a `shard.span.SpanModel` for blocks [0, K) (None for K = 0), `head` a
`shard.head.ClientHead`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from protocol import Codec, decode_tensor, encode_tensor

METRICS = ("l2", "cosine")
CHUNK_ROWS = 4096  # candidate rows per pass through the blocks
WIDEN_ABOVE = 0.05  # search: a best candidate this far (relative L2) is no match; try the whole vocabulary
Shortlist = Callable[[np.ndarray], np.ndarray]  # a received row [D] -> candidate token ids


def prompt_hidden(head, span, prompts: Sequence[Sequence[int]], codec: Codec = Codec.FP16) -> list[np.ndarray]:
    """What the first hop decodes for each prompt, [T, D]: embeddings, then blocks [0, K) in one
    pass (as the client runs a prompt), then the wire codec."""
    received = []
    for ids in prompts:
        hidden = head.embed_tokens(list(ids))
        if span is not None:
            hidden = span.run(hidden, span.new_cache(1, len(ids)))
        received.append(decode_tensor(encode_tensor(hidden, codec)).astype(np.float32)[0])
    return received


def nearest(rows: np.ndarray, table: np.ndarray, metric: str = "l2") -> np.ndarray:
    """Index of the nearest row of `table` [V, D] for each row of `rows` [N, D] -> [N]."""
    a, b = torch.from_numpy(np.ascontiguousarray(rows)), torch.from_numpy(np.ascontiguousarray(table))
    if metric == "cosine":
        return (torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T).argmax(-1).numpy()
    if metric != "l2":
        raise ValueError(f"metric {metric!r} is not one of {METRICS}")
    return ((b * b).sum(-1)[None] - 2 * a @ b.T).argmin(-1).numpy()


def lookup_attack(received: Sequence[np.ndarray], table: np.ndarray, metric: str = "l2") -> list[np.ndarray]:
    """Each received row's guess: the index of its nearest row of `table`."""
    return [nearest(rows, table, metric) for rows in received]


def embedding_attack(head, received: Sequence[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """The lookup in the embedding table, by each metric."""
    table = embedding_table(head)
    return {metric: lookup_attack(received, table, metric) for metric in METRICS}


def embedding_table(head) -> np.ndarray:
    return head.embed_weight.detach().to(torch.float32).numpy()


def single_token_table(head, span) -> np.ndarray:
    """Blocks [0, K) on every vocabulary token alone -> [V, D]."""
    table = embedding_table(head)
    out = []
    for start in range(0, len(table), CHUNK_ROWS):
        rows = table[start:start + CHUNK_ROWS, None].copy()
        out.append(span.run(rows, span.new_cache(len(rows), 1))[:, 0])
    return np.concatenate(out)


def fit_linear_inverter(head, span, texts: Sequence[Sequence[int]], ridge: float = 1e-2) -> np.ndarray:
    """A [D+1, D] least-squares map from hidden states after blocks [0, K) (plus a bias column) to
    the embeddings of the tokens that produced them, fitted on `texts` run through the blocks."""
    inputs, targets = [], []
    for ids in texts:
        embedded = head.embed_tokens(list(ids))
        inputs.append(span.run(embedded, span.new_cache(1, len(ids)))[0])
        targets.append(embedded[0])
    x = np.concatenate(inputs).astype(np.float64)
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    y = np.concatenate(targets).astype(np.float64)
    gram = x.T @ x + ridge * len(x) * np.eye(x.shape[1])
    return np.linalg.solve(gram, x.T @ y).astype(np.float32)


def inverter_attack(head, inverter: np.ndarray, received: Sequence[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """The fitted map, then the lookup in the embedding table."""
    mapped = [np.concatenate([rows, np.ones((len(rows), 1), np.float32)], axis=1) @ inverter for rows in received]
    return embedding_attack(head, mapped)


def search_attack(head, span, received: Sequence[np.ndarray], *, shortlists: Sequence[Shortlist] = (),
                  widen_above: float = WIDEN_ABOVE) -> tuple[list[np.ndarray], int]:
    """Position by position, each candidate token run through blocks [0, K) after the prefix
    recovered so far; the candidate whose output is nearest (L2) wins. Candidates: the whole
    vocabulary without `shortlists`, else the union of theirs; a position whose best candidate is
    farther than `widen_above` (relative L2: the right token is off only by the codec's rounding)
    is searched again over the whole vocabulary. Returns the guesses and how many positions were
    widened."""
    guesses, widened = [], 0
    vocab = len(embedding_table(head))
    for rows in received:
        recovered: list[int] = []
        for row in rows:
            ids = np.unique(np.concatenate([pick(row) for pick in shortlists])) if shortlists else np.arange(vocab)
            best, distance = _nearest_after_prefix(head, span, recovered, ids, row)
            if distance > widen_above and len(ids) < vocab:
                widened += 1
                best, distance = _nearest_after_prefix(head, span, recovered, np.arange(vocab), row)
            recovered.append(best)
        guesses.append(np.array(recovered))
    return guesses, widened


def nearest_rows(table: np.ndarray, n: int, transform=None) -> Shortlist:
    """A shortlist: the `n` rows of `table` nearest (L2) to a received row (after `transform`)."""
    def pick(row: np.ndarray) -> np.ndarray:
        query = row if transform is None else transform(row)
        distance = ((table - query) ** 2).sum(-1)
        return np.argpartition(distance, min(n, len(distance) - 1))[:n]
    return pick


def inverter_transform(inverter: np.ndarray):
    """A received row mapped back towards its embedding by a fitted linear inverter."""
    return lambda row: np.append(row, np.float32(1.0)) @ inverter


def _nearest_after_prefix(head, span, prefix: list[int], ids: np.ndarray, row: np.ndarray) -> tuple[int, float]:
    """The token of `ids` whose output after `prefix` is nearest `row`, and that distance relative to `row`'s norm."""
    distances = ((_after_prefix(head, span, prefix, ids) - row) ** 2).sum(-1)
    index = int(distances.argmin())
    return int(ids[index]), float(np.sqrt(distances[index] / max(float((row ** 2).sum()), 1e-30)))


def _after_prefix(head, span, prefix: list[int], ids: np.ndarray) -> np.ndarray:
    """Blocks [0, K) on each token of `ids` at position len(prefix), after `prefix` -> [len(ids), D]."""
    position = len(prefix)
    base = span.new_cache(1, position + 1)
    if prefix:
        span.run(head.embed_tokens(prefix), base)
    outputs = []
    for start in range(0, len(ids), CHUNK_ROWS):
        chunk = ids[start:start + CHUNK_ROWS]
        cache = span.new_cache(len(chunk), position + 1)
        cache.keys[:, :, :, :position] = base.keys[:, :, :, :position]  # the prefix, for every candidate
        cache.values[:, :, :, :position] = base.values[:, :, :, :position]
        cache.length = position
        embedded = head.embed_tokens(chunk.tolist()).reshape(len(chunk), 1, -1)
        outputs.append(span.run(embedded, cache)[:, 0])
    return np.concatenate(outputs)


def recovered_share(guesses: dict[str, list[np.ndarray]] | list[np.ndarray], prompts: Sequence[Sequence[int]]) -> float:
    """Share of prompt tokens guessed exactly; for guesses by several metrics, the best metric's."""
    if isinstance(guesses, dict):
        return max(recovered_share(by_metric, prompts) for by_metric in guesses.values())
    total = sum(len(ids) for ids in prompts)
    return sum(int((np.asarray(guess) == np.asarray(ids)).sum()) for guess, ids in zip(guesses, prompts)) / total


def most_common_share(prompts: Sequence[Sequence[int]]) -> float:
    """What always guessing the prompts' most common token recovers: the floor any attack must beat."""
    ids, counts = np.unique(np.concatenate([np.asarray(p) for p in prompts]), return_counts=True)
    return counts.max() / counts.sum()
