"""The event trace of a run: what happened when, in virtual time, and a hash of all of it.

Every line is `<virtual seconds> <kind> key=value ...`, written in the order things happen. Two
runs of one scenario and seed give the same lines, so the same hash; the hash is what a run
prints and what the determinism tests compare. Values are formatted deterministically (floats to
microseconds), and nothing random-per-process (session ids, object ids) goes in.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import trio


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    if isinstance(value, (list, tuple)):
        return ",".join(_format(v) for v in value)
    return str(value).replace(" ", "_")


class Trace:
    def __init__(self, *, keep_lines: bool = False):
        self._hash = hashlib.sha256()
        self.counts: Counter[str] = Counter()
        self.keep_lines = keep_lines
        self.lines: list[str] = []

    def record(self, kind: str, **fields: object) -> None:
        line = f"{trio.current_time():.6f} {kind}"
        if fields:
            line += " " + " ".join(f"{key}={_format(value)}" for key, value in fields.items())
        self._hash.update(line.encode() + b"\n")
        self.counts[kind] += 1
        if self.keep_lines:
            self.lines.append(line)

    @property
    def digest(self) -> str:
        """The first 16 hex digits of the sha256 of every line so far."""
        return self._hash.hexdigest()[:16]


def token_digest(token_ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, token_ids)).encode()).hexdigest()[:12]
