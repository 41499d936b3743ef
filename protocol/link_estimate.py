"""A link's latency and bandwidth, estimated from request/response exchanges a client timed.

Each exchange is the bytes that crossed the link (both ways) and the seconds it took, less the
time the peer said it computed. Modelled as `seconds = latency + bytes / bandwidth`, with noise that
only ever adds time (a scheduler, a thread hand-off, a queue): so the exchanges are grouped by size
(powers of two), the fastest of each group kept, and a line fitted through those by least squares.

The estimate is given only when it is worth trusting: at least two sizes, a positive slope, and
bytes that explain at least `min_signal_s` between the smallest and largest exchange. On a fast
link (loopback, a LAN) the bytes explain microseconds, far below the noise of a real clock: then
`estimate_link` says None, and callers treat the link as fast.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

MIN_SIGNAL_S = 0.01  # what the bytes must explain across the sizes seen, for the estimate to count


@dataclass(frozen=True)
class Exchange:
    """One request and its reply over a link."""

    wire_bytes: int  # both ways
    seconds: float  # from sending the request to receiving the reply, less the peer's compute


@dataclass(frozen=True)
class LinkEstimate:
    latency_s: float  # the part of an exchange that does not grow with its bytes (>= 0)
    bandwidth_bytes_per_s: float


def estimate_link(exchanges: Iterable[Exchange], *, min_signal_s: float = MIN_SIGNAL_S) -> LinkEstimate | None:
    """The link under `exchanges`, or None when they cannot tell it from a fast one (see above)."""
    fastest: dict[int, Exchange] = {}
    for exchange in exchanges:
        if exchange.wire_bytes <= 0 or not math.isfinite(exchange.seconds):
            continue
        size = exchange.wire_bytes.bit_length()
        if size not in fastest or exchange.seconds < fastest[size].seconds:
            fastest[size] = exchange
    if len(fastest) < 2:
        return None
    points = [(float(e.wire_bytes), max(e.seconds, 0.0)) for e in fastest.values()]
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread  # seconds per byte
    span = max(x for x, _ in points) - min(x for x, _ in points)
    if slope <= 0 or slope * span < min_signal_s:
        return None
    return LinkEstimate(latency_s=max(mean_y - slope * mean_x, 0.0), bandwidth_bytes_per_s=1.0 / slope)
