"""Fault injection on purpose: a node that lies or stalls, for tests, demos and the simulator.

`hearth node --chaos SPEC` makes the node misbehave the way an attacker or a sick machine would,
so the client's defences (spot-check verification, failover) can be seen working on real
processes:

- `corrupt:REL`: noise of relative size REL (per token row: standard deviation REL x the row's
  RMS) added to every output of the node's span, decode and replay alike;
- `corrupt-sometimes:REL:P`: the same noise on each step with probability P;
- `stall:SECONDS`: every step answered SECONDS late (a slow or frozen node);
- `corrupt-pieces`: every piece of the model this node uploads to a peer fetching it
  (`node.piece_server`) has one byte flipped: the fetcher's hash check must catch it.

The noise comes from a generator seeded with `--chaos-seed` (default 0), so a run repeats. Chaos
is never on by default and has no other way in (no environment variable, no file): only the flag,
which the daemon announces at WARNING at start and which `/metrics` shows as
`hearth_chaos_enabled`. Parsing is `parse_chaos`, one line of error for a bad value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mesh import virtual_time
from shard.errors import InvalidInput

KINDS = ("corrupt", "corrupt-sometimes", "stall", "corrupt-pieces")
USAGE = "corrupt:REL, corrupt-sometimes:REL:P, stall:SECONDS or corrupt-pieces"


@dataclass(frozen=True)
class ChaosSpec:
    kind: str  # one of KINDS
    relative: float = 0.0  # corrupt*: noise RMS as a share of each output row's RMS
    probability: float = 1.0  # corrupt-sometimes: share of steps corrupted
    stall_s: float = 0.0  # stall: seconds added to every step
    seed: int = 0

    def describe(self) -> str:
        if self.kind == "corrupt-pieces":
            return "one byte flipped in every piece of the model it uploads"
        if self.kind == "stall":
            return f"every step answered {self.stall_s:g} s late"
        steps = "every output" if self.kind == "corrupt" else f"each output with probability {self.probability:g}"
        return f"noise of relative size {self.relative:g} added to {steps} (seed {self.seed})"


def parse_chaos(text: str, seed: int = 0) -> ChaosSpec:
    """`corrupt:REL`, `corrupt-sometimes:REL:P` or `stall:SECONDS`; InvalidInput says what is wrong."""
    kind, *values = text.split(":")
    counts = {"corrupt": 1, "corrupt-sometimes": 2, "stall": 1, "corrupt-pieces": 0}
    if kind not in counts:
        raise InvalidInput(f"--chaos {text!r}: unknown fault {kind!r}; expected {USAGE}")
    if len(values) != counts[kind]:
        raise InvalidInput(f"--chaos {text!r}: {kind} takes {counts[kind]} value(s); expected {USAGE}")
    try:
        numbers = [float(value) for value in values]
    except ValueError:
        raise InvalidInput(f"--chaos {text!r}: values must be numbers; expected {USAGE}") from None
    if not all(math.isfinite(n) for n in numbers):
        raise InvalidInput(f"--chaos {text!r}: values must be finite")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidInput(f"--chaos-seed must be a non-negative integer, got {seed!r}")
    if kind == "corrupt-pieces":
        return ChaosSpec(kind, seed=seed)
    if kind == "stall":
        if numbers[0] <= 0:
            raise InvalidInput(f"--chaos {text!r}: SECONDS must be positive")
        return ChaosSpec(kind, stall_s=numbers[0], seed=seed)
    if numbers[0] <= 0:
        raise InvalidInput(f"--chaos {text!r}: REL must be positive (0.01 adds 1% noise)")
    if kind == "corrupt-sometimes":
        if not 0 < numbers[1] <= 1:
            raise InvalidInput(f"--chaos {text!r}: P must be in (0, 1]")
        return ChaosSpec(kind, relative=numbers[0], probability=numbers[1], seed=seed)
    return ChaosSpec(kind, relative=numbers[0], seed=seed)


class Chaos:
    """What a node with a `ChaosSpec` does to each step's output (`node.sessions.SessionManager.step`)."""

    def __init__(self, spec: ChaosSpec):
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.steps_corrupted = 0
        self.steps_stalled = 0

    async def apply(self, output: np.ndarray) -> np.ndarray:
        """`output` [B, T, D] as this node hands it back: late, noisy, or as it is."""
        spec = self.spec
        if spec.kind == "corrupt-pieces":
            return output
        if spec.kind == "stall":
            self.steps_stalled += 1
            await virtual_time.sleep(spec.stall_s)
            return output
        if spec.kind == "corrupt-sometimes" and self.rng.random() >= spec.probability:
            return output
        self.steps_corrupted += 1
        rms = np.sqrt(np.mean(np.square(output, dtype=np.float64), axis=-1, keepdims=True))  # [B, T, 1]
        noise = self.rng.standard_normal(output.shape) * (spec.relative * rms)
        return (output + noise).astype(np.float32)

    def tamper(self, piece: bytes) -> bytes:
        """A piece of the model as this node uploads it: one byte flipped under `corrupt-pieces`."""
        if self.spec.kind != "corrupt-pieces" or not piece:
            return piece
        at = int(self.rng.integers(len(piece)))
        return piece[:at] + bytes([piece[at] ^ 0xFF]) + piece[at + 1:]
