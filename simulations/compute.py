"""The compute model: spans that cost virtual time, with stand-in activations that still check out.

A `CostModelSpan` implements the span interface the node's session manager uses
(`shard.interfaces.Span`), with `modelled_seconds(batch, tokens)`, which the manager waits out:
the device profile's time per block per token, in trio's clock. Its KV cache is virtual (`nbytes` is what the real model's cache
would take, so the node's KV budget is exercised) and the activations are stand-ins.

Stand-in activations: the first `LIVE` channels carry integers modulo a prime; each block maps
them with integer affine arithmetic that depends on the position and on a running sum of that
block's inputs (its "KV cache"). Every operation is exact in float64, so any split of the blocks
into hops, any chunking, and any correct replay give bit-identical results, while a lost or
misplaced position changes every later token. The stand-in head turns the channels into a token.
A step of at most `ROW_EXACT_TOKENS` tokens leaves the running sums at each of its positions in the
cache, so a rewind may cut inside it (speculative decoding keeps a prefix of its drafts).
`TimedSpan` wraps a real span with the same `modelled_seconds`, for small runs with real math.
"""

from __future__ import annotations

import json
from pathlib import Path

from collections.abc import Sequence

import numpy as np

from shard.batch import EXACT_BATCH_ROWS, exact_batch_rows
from shard.config import ModelConfig
from shard.errors import CacheFull, InvalidInput, ShardError
from shard.interfaces import ROW_EXACT_TOKENS, BatchStep, Cache, Span
from simulations.scenario import DeviceProfile, ModelShape

LIVE = 1  # channels of the stand-in activations that carry information (kept small: it is the simulator's own
# cost); `StandInWeights.blocks_one_position` is unrolled for it
PRIME = 65521  # values stay below 2**16; products below 2**36: exact in float64 (and in float32 on the wire)
PYTHON_MAX_TOKENS = 256  # up to this many positions, plain Python beats an array per block
MODEL_DIR_NAME = "sim-model"  # the client's model id comes from the directory name: keep it fixed


def step_seconds(device: DeviceProfile, blocks: int, tokens: int) -> float:
    """Seconds `device` takes to run `tokens` new positions through `blocks` blocks."""
    per_token = blocks * device.block_ms / 1000.0
    return per_token * (1.0 + device.prefill_factor * (tokens - 1))


def blocks_that_fit(device: DeviceProfile, model: ModelShape) -> int:
    """How many blocks' weights fit in the device's memory (at least one, at most the model)."""
    per_block = model.block_params * device.bytes_per_param
    return max(1, min(model.blocks, int(device.weights_gb * 1e9 // per_block)))


def kv_bytes(model: ModelShape, blocks: int, batch: int, positions: int) -> int:
    """Bytes of the real model's KV cache for `blocks` blocks."""
    return int(2 * blocks * batch * model.kv_heads * model.head_dim * positions * model.kv_bytes_per_value)


class StandInWeights:
    """Per-block integer coefficients, the same for every node of one model (seeded by its name)."""

    def __init__(self, model: ModelShape):
        rng = np.random.default_rng(sum(model.name.encode()) + 7919 * model.blocks)
        self.scale = rng.integers(1, 4096, size=(model.blocks, LIVE)).astype(np.float64)
        self.mix = rng.integers(1, 4096, size=(model.blocks, LIVE)).astype(np.float64)
        self.shift = rng.integers(1, 4096, size=(model.blocks, LIVE)).astype(np.float64)
        self.embed = rng.integers(0, PRIME, size=(model.vocab, LIVE)).astype(np.float64)
        self.readout = rng.integers(1, 4096, size=LIVE).astype(np.float64)
        self.vocab = model.vocab
        # per block: scale, mix and shift of each channel, as one tuple of Python floats (for the decode path)
        self._rows = [tuple(np.stack([self.scale[b], self.mix[b], self.shift[b]], axis=1).ravel().tolist())
                      for b in range(model.blocks)]
        self.embed_rows = self.embed.tolist()  # token -> its LIVE channels, as Python floats
        self.readout_row = self.readout.tolist()

    def block(self, index: int, live: np.ndarray, state: np.ndarray, first_position: int,
              prefixes: list[np.ndarray] | None = None) -> np.ndarray:
        """Block `index` on `live` [B, T, LIVE] (integers); updates `state` [B] (running input sum) and
        appends the running sum at each position [B, T] to `prefixes` when given."""
        prefix = (state[:, None] + np.cumsum(live[:, :, 0], axis=1)) % PRIME  # [B, T]
        state[:] = prefix[:, -1]
        if prefixes is not None:
            prefixes.append(prefix)
        positions = np.arange(first_position + 1, first_position + 1 + live.shape[1], dtype=np.float64)
        out = live * self.scale[index] + prefix[:, :, None] * self.mix[index] + positions[None, :, None] * self.shift[index]
        return out % PRIME

    def blocks_one_position(self, start: int, live: list[float], state: list[float], position: int) -> list[float]:
        """Blocks start, start+1, ... on one position's channels: the same integers as `block`, without numpy.

        `state` holds one running sum per block (updated in place); used for decode steps, the common case.
        """
        x, = live  # LIVE channels, unrolled: this runs for every block of every decoded token
        p = float(position + 1)
        for offset, (a, m, c) in enumerate(self._rows[start:start + len(state)]):
            prefix = (state[offset] + x) % PRIME
            state[offset] = prefix
            x = (x * a + prefix * m + p * c) % PRIME
        return [x]

    def token(self, live_last: list[float]) -> int:
        """The stand-in head's choice for one position's channels [LIVE] (exact: integers, sums below 2**31)."""
        return int(sum(x * r for x, r in zip(live_last, self.readout_row)) % self.vocab)


class VirtualCache:
    """A session's cache as the cost model keeps it: a running sum per block, the real size in bytes.

    It keeps the running sums at every step boundary, and at every position inside a step of at
    most `ROW_EXACT_TOKENS` tokens, so `truncate` may cut there (a rewind after speculation)."""

    def __init__(self, blocks: int, batch: int, max_length: int, nbytes: int):
        self.batch, self.max_length, self.nbytes = batch, max_length, nbytes
        self.length = 0
        self.state = np.zeros((blocks, batch))
        self._snapshots: dict[int, np.ndarray] = {0: self.state.copy()}  # position -> state there

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_length:
            raise CacheFull(self.length + new_tokens, self.max_length)

    def advance(self, new_tokens: int, inside: np.ndarray | None = None) -> None:
        """`new_tokens` positions were written; `inside` [new_tokens - 1, blocks, batch]: the running
        sums after each of them but the last (the state holds those after the last)."""
        if inside is not None:
            for t, state in enumerate(inside, start=self.length + 1):
                self._snapshots[t] = state
        self.length += new_tokens
        self._snapshots[self.length] = self.state.copy()

    def truncate(self, length: int) -> None:
        if length not in self._snapshots or length > self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length
        self.state = self._snapshots[length].copy()
        self._snapshots = {p: s for p, s in self._snapshots.items() if p <= length}


class CostModelSpan:
    """Blocks [start, end) on a device profile: stand-in math now, compute time via `modelled_seconds`.

    Implements `shard.interfaces.Span`, as a quantized span whose rows batch exactly would."""

    quant = "int8"

    def __init__(self, model: ModelShape, config: ModelConfig, weights: StandInWeights, device: DeviceProfile,
                 start: int, end: int):
        if not 0 <= start < end <= model.blocks:
            raise InvalidInput(f"span [{start}, {end}) is outside the model's {model.blocks} blocks")
        self.model, self.config, self.weights, self.device = model, config, weights, device
        self.start, self.end = start, end

    @property
    def batch_rows(self) -> int:
        return exact_batch_rows(self.quant)

    chunk_invariant = True  # exact integer arithmetic, whatever the steps

    def sub_span(self, start: int, end: int) -> CostModelSpan:
        if not self.start <= start < end <= self.end:
            raise InvalidInput(f"[{start}, {end}) is not within [{self.start}, {self.end})")
        return CostModelSpan(self.model, self.config, self.weights, self.device, start, end)

    def cache_bytes(self, batch: int, max_length: int) -> int:
        return kv_bytes(self.model, self.end - self.start, batch, max_length)

    def new_cache(self, batch: int, max_length: int) -> VirtualCache:
        return VirtualCache(self.end - self.start, batch, max_length, self.cache_bytes(batch, max_length))

    def run(self, hidden: np.ndarray, cache: VirtualCache, passes: Sequence[int] = ()) -> np.ndarray:
        # hidden: [B, T, D] -> [B, T, D]; only the first LIVE channels change
        if hidden.ndim != 3 or hidden.shape[2] != self.config.hidden_size or hidden.shape[0] != cache.batch:
            raise InvalidInput(f"hidden states must be [{cache.batch}, T, {self.config.hidden_size}], "
                               f"got {list(hidden.shape)}")
        if len(passes) > 1 and sum(passes) != hidden.shape[1]:
            raise InvalidInput(f"passes {list(passes)} do not split the step's {hidden.shape[1]} tokens")
        cache.check_room(hidden.shape[1])
        out = np.array(hidden, dtype=np.float32)
        offset = 0
        for tokens in passes if len(passes) > 1 else (hidden.shape[1],):
            keep = 1 < tokens <= ROW_EXACT_TOKENS  # a rewind may cut inside such a pass: keep each position's sums
            out[:, offset:offset + tokens, :LIVE], inside = self._blocks(out[:, offset:offset + tokens, :LIVE],
                                                                         cache, keep)
            cache.advance(tokens, inside)
            offset += tokens
        return out

    def _blocks(self, live: np.ndarray, cache: VirtualCache, keep: bool) -> tuple[np.ndarray | list, np.ndarray | None]:
        """The blocks on `live` [B, T, LIVE]; with `keep`, also the running sums after each position
        but the last, [T - 1, blocks, B] (for `VirtualCache.advance`)."""
        if live.shape[0] == 1 and live.shape[1] <= PYTHON_MAX_TOKENS:  # one sequence: Python floats, position by position
            state, first = cache.state[:, 0].tolist(), cache.length
            out, inside = [], []
            for t, row in enumerate(live[0].tolist()):
                out.append(self.weights.blocks_one_position(self.start, row, state, first + t))
                if keep:
                    inside.append(list(state))
            cache.state[:, 0] = state
            return out, np.array(inside[:-1])[:, :, None] if keep else None
        live = live.astype(np.float64)
        prefixes = []
        for offset, index in enumerate(range(self.start, self.end)):
            live = self.weights.block(index, live, cache.state[offset], cache.length, prefixes if keep else None)
        # prefixes: per block [B, T] -> [T - 1, blocks, B]
        return live, np.stack(prefixes)[:, :, :-1].transpose(2, 0, 1).copy() if keep else None

    def run_batch(self, steps: Sequence[BatchStep]) -> list[np.ndarray | Exception]:
        """Concurrent sessions' steps; their cost is one `modelled_seconds` (the node's)."""
        outputs: list[np.ndarray | Exception] = []
        for step in steps:
            try:
                outputs.append(self.sub_span(step.start, step.end).run(step.hidden, step.cache))
            except ShardError as err:
                outputs.append(err)
        return outputs

    def modelled_seconds(self, batch: int, tokens: int) -> float:
        return step_seconds(self.device, self.end - self.start, batch * tokens)


class TimedSpan:
    """A real torch span whose compute costs the device profile's time in trio's clock."""

    def __init__(self, span: Span, device: DeviceProfile):
        self.span, self.device = span, device
        self.start, self.end, self.quant, self.config = span.start, span.end, span.quant, span.config

    @property
    def batch_rows(self) -> int:
        return self.span.batch_rows

    @property
    def chunk_invariant(self) -> bool:
        return self.span.chunk_invariant

    def sub_span(self, start: int, end: int) -> TimedSpan:
        return TimedSpan(self.span.sub_span(start, end), self.device)

    def cache_bytes(self, batch: int, max_length: int) -> int:
        return self.span.cache_bytes(batch, max_length)

    def new_cache(self, batch: int, max_length: int) -> Cache:
        return self.span.new_cache(batch, max_length)

    def run(self, hidden: np.ndarray, cache: Cache, passes: Sequence[int] = ()) -> np.ndarray:
        return self.span.run(hidden, cache, passes)

    def run_batch(self, steps: Sequence[BatchStep]) -> list[np.ndarray | Exception]:
        return self.span.run_batch(steps)

    def modelled_seconds(self, batch: int, tokens: int) -> float:
        return step_seconds(self.device, self.end - self.start, batch * tokens)


class StandInHead:
    """The client's embeddings and LM head for stand-in activations (`shard.interfaces.Head`)."""

    batch_rows = EXACT_BATCH_ROWS  # each row's token is exact integer arithmetic: concurrent users share a pass

    def __init__(self, config: ModelConfig, weights: StandInWeights):
        self.config, self.weights = config, weights

    def embed_tokens(self, ids: Sequence[int]) -> np.ndarray:
        # one sequence's ids -> [1, T, D]
        out = np.zeros((1, len(ids), self.config.hidden_size), dtype=np.float32)
        if len(ids) == 1:  # a decode step
            out[0, 0, :LIVE] = self.weights.embed_rows[int(ids[0]) % self.weights.vocab]
        else:
            out[0, :, :LIVE] = self.weights.embed[np.asarray(ids, dtype=np.int64) % self.weights.vocab]
        return out

    def next_logits(self, hidden: np.ndarray) -> np.ndarray:
        # hidden: [N, D] -> [N, V], one-hot at the stand-in token (`StandInWeights.token` of each row)
        rows = hidden[:, :LIVE].tolist()
        out = np.zeros((len(rows), self.config.vocab_size), dtype=np.float32)
        for row, live in enumerate(rows):
            out[row, self.weights.token(live)] = 1.0
        return out


def reference_tokens(weights: StandInWeights, blocks: int, prompt: list[int], new_tokens: int) -> list[int]:
    """What a failure-free run produces: every block in one process, the client's chunking."""
    if not prompt:
        raise ValueError("a reference needs a prompt of at least one token")
    sums = [0.0] * blocks
    for position, token in enumerate(prompt):
        last = weights.blocks_one_position(0, weights.embed_rows[token % weights.vocab], sums, position)
    tokens, position = [weights.token(last)], len(prompt)
    while len(tokens) < new_tokens:
        last = weights.blocks_one_position(0, weights.embed_rows[tokens[-1] % weights.vocab], sums, position)
        tokens.append(weights.token(last))
        position += 1
    return tokens


def write_stand_in_model(root: Path, model: ModelShape) -> Path:
    """A model directory the real `Client` can load (config only; the head is passed in)."""
    path = Path(root) / MODEL_DIR_NAME
    path.mkdir(parents=True, exist_ok=True)
    heads = max(1, model.stand_in_hidden // 64)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": model.vocab,
              "hidden_size": model.stand_in_hidden, "intermediate_size": 4 * model.stand_in_hidden,
              "num_hidden_layers": model.blocks, "num_attention_heads": heads, "num_key_value_heads": heads,
              "max_position_embeddings": model.max_length, "rms_norm_eps": 1e-5}
    (path / "config.json").write_text(json.dumps(config, sort_keys=True, indent=1))
    return path


def bandwidth_scale(model: ModelShape, sim_bytes_per_value: float = 4.0) -> float:
    """Links carry the stand-in's bytes this much slower, so a hop takes the real activations' time."""
    real = model.hidden_size * model.wire_bytes_per_value
    return min(1.0, model.stand_in_hidden * sim_bytes_per_value / real) if real > 0 else 1.0


def describe(model: ModelShape) -> dict:
    """The model's figures that a report states."""
    return {"name": model.name, "blocks": model.blocks, "hidden_size": model.hidden_size,
            "kv_bytes_per_token_per_block": kv_bytes(model, 1, 1, 1),
            "stand_in_hidden": model.stand_in_hidden, "bandwidth_scale": round(bandwidth_scale(model), 6),
            "block_gb_int8": round(model.block_params / 1e9, 3)}
