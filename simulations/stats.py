"""Statistics the report and the simulator's parts share: percentiles and session outcomes."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from simulations.users import SessionRecord


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q`-th percentile (0-100) of `values`, linearly interpolated; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def session_summary(sessions: Sequence[SessionRecord]) -> dict:
    outcomes = Counter(s.outcome for s in sessions)
    errors = Counter(s.error.split(":")[0] for s in sessions if s.outcome == "failed")
    started = len(sessions)
    return {"started": started, "completed": outcomes["completed"], "failed_with_error": outcomes["failed"],
            "hung": outcomes["hung"], "completion_rate": round(outcomes["completed"] / started, 4) if started else None,
            "errors": dict(sorted(errors.items()))}
