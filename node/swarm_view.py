"""What the `/swarm` page shows: the peers serving this model, probed now, and what changed.

`SwarmWatch.snapshot()` looks the model up, probes every record (the client's own probe: a round
trip and the node's fresh span info), and compares with the previous survey to tell what happened
since: a node joined, stopped answering, or moved to other blocks (rebalancing). The API adds the
failovers its generations suffered. Surveys are shared: page polls from several tabs within
`min_interval_s` get the same one, and only one survey runs at a time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from mesh.client import Client
from mesh.pipeline import Recovery

MAX_PEERS = 256  # peers one survey probes (a household has a few; the page is not a crawler)
MAX_EVENTS = 50
SURVEY_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Seen:
    start: int
    end: int
    online: bool


def short(peer_id: str) -> str:
    return peer_id[-6:]


def gaps(coverage: list[int]) -> list[list[int]]:
    """Half-open block ranges where coverage is 0."""
    found, start = [], None
    for block, count in enumerate(coverage + [1]):
        if count == 0 and start is None:
            start = block
        elif count and start is not None:
            found.append([start, block])
            start = None
    return found


class SwarmWatch:
    def __init__(self, client: Client, *, wall_clock: Callable[[], float], min_interval_s: float = 1.0):
        self.client, self.wall_clock, self.min_interval_s = client, wall_clock, min_interval_s
        self.events: deque[dict] = deque(maxlen=MAX_EVENTS)
        self._seen: dict[str, Seen] | None = None  # None until the first survey
        self._last: tuple[float, dict] | None = None  # (trio time, snapshot)
        self._lock = trio.Lock()

    def failover(self, recovery: Recovery) -> None:
        to = ", ".join(short(p) for p in recovery.replacements) or "nobody"
        self._event("failover", recovery.failed_peer,
                    f"{short(recovery.failed_peer)} [{recovery.start}:{recovery.end}] failed ({recovery.reason}); "
                    f"{recovery.tokens_replayed} tokens replayed on {to} in {recovery.seconds:.2f} s")

    async def snapshot(self) -> dict:
        async with self._lock:
            if self._last is not None and trio.current_time() - self._last[0] < self.min_interval_s:
                return self._last[1]
            with trio.fail_after(SURVEY_TIMEOUT_S):
                survey = await self.client.survey(limit=MAX_PEERS)
            snapshot = self._describe(survey)
            self._last = (trio.current_time(), snapshot)
            return snapshot

    def _describe(self, survey) -> dict:
        n_blocks = self.client.config.num_layers
        me = self.client.transport.peer_id
        coverage = [0] * n_blocks
        peers, seen = [], {}
        for record, info in survey:
            online = info is not None
            start, end = (info.start, info.end) if online else (record.info.start, record.info.end)
            seen[record.peer_id] = Seen(start, end, online)
            if online:
                for block in range(max(0, start), min(end, n_blocks)):
                    coverage[block] += 1
            current = info or record.info
            rtt = self.client.rtts.get(record.peer_id) if online else None
            peers.append({"peer_id": record.peer_id, "start": start, "end": end, "quantization": current.quantization,
                          "online": online, "rtt_ms": None if rtt is None else round(rtt * 1000, 2),
                          "throughput": round(current.throughput, 2), "sessions": current.sessions,
                          "free_cache_tokens": current.free_cache_tokens, "self": record.peer_id == me})
        self._compare(seen)
        return {"model": {"id": self.client.model_id, "digest": self.client.manifest_hash, "blocks": n_blocks},
                "updated": self.wall_clock(), "peers": peers, "coverage": coverage, "gaps": gaps(coverage),
                "events": list(self.events)[::-1]}

    def _compare(self, seen: dict[str, Seen]) -> None:
        before, self._seen = self._seen, seen
        if before is None:
            return
        for peer, now in seen.items():
            was = before.get(peer)
            if now.online and (was is None or not was.online):
                self._event("joined", peer, f"{short(peer)} answers, serving blocks {now.start}:{now.end}")
            elif now.online and (was.start, was.end) != (now.start, now.end):
                self._event("moved", peer, f"{short(peer)} moved from blocks {was.start}:{was.end} to {now.start}:{now.end}")
            elif not now.online and was is not None and was.online:
                self._event("left", peer, f"{short(peer)} stopped answering (blocks {now.start}:{now.end})")
        for peer, was in before.items():
            if peer not in seen and was.online:
                self._event("left", peer, f"{short(peer)} withdrew (blocks {was.start}:{was.end})")

    def _event(self, kind: str, peer_id: str, text: str) -> None:
        self.events.append({"time": self.wall_clock(), "kind": kind, "peer_id": peer_id, "text": text})
