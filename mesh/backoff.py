"""Retry policy as pure functions and small state: exponential backoff with jitter, lengthening bans.

Time comes in as `now` (trio's clock in the client) and randomness from a seeded `random.Random`,
so tests and the simulator replay the exact same decisions.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


def backoff_delay(attempt: int, rng: random.Random, *, base_s: float = 0.1, cap_s: float = 5.0) -> float:
    """Seconds to wait before retry number `attempt` (0-based): exponential, capped, jittered to 50-100%."""
    ceiling = min(cap_s, base_s * 2**attempt)
    return ceiling * (0.5 + 0.5 * rng.random())


@dataclass
class BanList:
    """Peers the client will not use for a while; each repeat offence doubles the ban. A peer that
    is only busy (it refused for want of session slots or KV cache) sits out `busy_s`, no strike."""

    base_s: float = 15.0
    cap_s: float = 600.0
    busy_s: float = 2.0
    until: dict[str, float] = field(default_factory=dict)
    strikes: dict[str, int] = field(default_factory=dict)

    def ban(self, peer_id: str, now: float, *, busy: bool = False) -> float:
        """Ban `peer_id` from `now`; returns the ban's length in seconds."""
        if busy:
            self.until[peer_id] = max(self.until.get(peer_id, now), now + self.busy_s)
            return self.busy_s
        self.strikes[peer_id] = self.strikes.get(peer_id, 0) + 1
        length = min(self.cap_s, self.base_s * 2 ** (self.strikes[peer_id] - 1))
        self.until[peer_id] = max(self.until.get(peer_id, now), now + length)  # a ban for good stays
        return length

    def ban_for_good(self, peer_id: str) -> None:
        """Never use `peer_id` again (it was caught returning wrong results: `mesh.spot_check`)."""
        self.until[peer_id] = math.inf

    def banned_for_good(self, peer_id: str) -> bool:
        return self.until.get(peer_id) == math.inf

    def banned(self, now: float) -> frozenset[str]:
        return frozenset(peer for peer, end in self.until.items() if end > now)
