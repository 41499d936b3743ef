"""The peer cache: peers this node reached before, on disk, to rejoin with every bootstrap host gone.

A small JSON file (`{"version": 1, "peers": [{"peer_id", "addrs", "last_seen"}, ...]}`) written
atomically (temporary file, fsync, rename). It keeps the `max_peers` most recently seen peers;
`last_seen` is wall-clock seconds from the clock passed in. A missing or corrupt file is an empty
cache (logged), never a failed start. `rejoin` dials the cached peers, most recent first.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from mesh.errors import DialError
from mesh.transport import Transport
from shard.atomic_file import atomic_write

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAX_ADDRS_PER_PEER = 8
MAX_FILE_BYTES = 1 << 20


@dataclass
class CachedPeer:
    peer_id: str
    addrs: list[str]  # full multiaddrs, each ending in /p2p/<peer_id>
    last_seen: float


class PeerCache:
    """Peers seen, loaded from `path` at construction; `save` writes it back if anything changed."""

    def __init__(self, path: os.PathLike | str, *, clock: Callable[[], float], max_peers: int = 64):
        self.path, self.clock, self.max_peers = Path(path), clock, max_peers
        self._peers: dict[str, CachedPeer] = {p.peer_id: p for p in _read(self.path)}
        self._dirty = False

    def peers(self) -> list[CachedPeer]:
        """Cached peers, most recently seen first."""
        return sorted(self._peers.values(), key=lambda p: p.last_seen, reverse=True)

    def remember(self, peer_id: str, addrs: list[str]) -> None:
        """Record that `peer_id` was reached at `addrs`; saves at once if it is news."""
        addrs = [a for a in addrs if a.endswith(f"/p2p/{peer_id}")][:MAX_ADDRS_PER_PEER]
        if not addrs:
            return
        known = self._peers.get(peer_id)
        news = known is None or not set(addrs) <= set(known.addrs)
        merged = list(dict.fromkeys(addrs + (known.addrs if known else [])))[:MAX_ADDRS_PER_PEER]
        self._peers[peer_id] = CachedPeer(peer_id, merged, self.clock())
        self._dirty = True
        if len(self._peers) > self.max_peers:
            for stale in self.peers()[self.max_peers:]:
                del self._peers[stale.peer_id]
        if news:
            self.save()

    def forget(self, peer_id: str) -> None:
        if self._peers.pop(peer_id, None) is not None:
            self._dirty = True

    def save(self) -> None:
        """Write the cache atomically if it changed; an I/O error is logged, not raised."""
        if not self._dirty:
            return
        data = {"version": FORMAT_VERSION,
                "peers": [{"peer_id": p.peer_id, "addrs": p.addrs, "last_seen": p.last_seen} for p in self.peers()]}
        try:
            with atomic_write(self.path) as file:
                file.write(json.dumps(data, indent=1).encode())
        except OSError as err:
            log.warning("cannot save the peer cache to %s: %s", self.path, err)
            return
        self._dirty = False


async def rejoin(transport: Transport, cache: PeerCache, *, timeout: float, max_peers: int = 8) -> list[str]:
    """Dial up to `max_peers` cached peers at once, each within `timeout`; the peer ids reached."""
    reached: list[str] = []

    async def try_peer(peer: CachedPeer) -> None:
        for addr in peer.addrs:
            try:
                reached.append(await transport.dial(addr, timeout=timeout))
                return
            except DialError as err:
                log.debug("cached peer unreachable: %s", err)

    async with trio.open_nursery() as nursery:
        for peer in cache.peers()[:max_peers]:
            nursery.start_soon(try_peer, peer)
    log.info("rejoined %d of %d cached peers", len(reached), min(max_peers, len(cache.peers())))
    return reached


def _read(path: Path) -> list[CachedPeer]:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes is too large")
        data = json.loads(path.read_bytes())
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unknown version {data.get('version')!r}")
        return [CachedPeer(str(p["peer_id"]), [str(a) for a in p["addrs"]][:MAX_ADDRS_PER_PEER],
                           float(p["last_seen"])) for p in data["peers"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("ignoring unreadable peer cache %s: %s", path, err)
        return []

