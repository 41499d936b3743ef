"""The peer cache: peers this node reached before, on disk, to rejoin with every bootstrap host gone.

A small JSON file (`{"version": 2, "peers": [{"peer_id", "addrs", "last_seen", "served",
"last_served", "failures"}, ...]}`) written atomically (temporary file, fsync, rename); a version 1
file (no service record) loads as a cache of peers that never served. Times are wall-clock seconds
from the clock passed in. A missing or corrupt file is an empty cache (logged), never a failed start.

Every peer dialled enters the cache, so whoever can make us dial many throwaway identities could
push the honest peers out, and a rejoin would reach only them. The cache therefore keeps the peers
that served us (a generation carried to the end: `credit`) over any number that never did, and
ranks them first: `standing` orders trusted peers (served, and not failing since) by their last
service, then the rest by when last seen; within each, a peer that failed lately (a dial, a hop:
`fault`) ranks below one that did not. Over `max_peers`, the lowest-ranked go. `rejoin` dials in
that order.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

from mesh.errors import DialError
from mesh.transport import Transport
from shard.atomic_file import atomic_write

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 had no service record: its peers load as never served
MAX_ADDRS_PER_PEER = 8
MAX_FILE_BYTES = 1 << 20
UNTRUSTED_AFTER_FAILURES = 3  # failures in a row that cancel a peer's past service (gone for good, likely)


@dataclass
class CachedPeer:
    peer_id: str
    addrs: list[str]  # full multiaddrs, each ending in /p2p/<peer_id>
    last_seen: float
    served: int = 0  # generations it carried to the end for us
    last_served: float = 0.0
    failures: int = 0  # failed dials and hops since it last answered a dial or served

    @property
    def trusted(self) -> bool:
        return self.served > 0 and self.failures < UNTRUSTED_AFTER_FAILURES


def standing(peer: CachedPeer) -> tuple:
    """Sort key, best first: trusted peers, then the rest; fewer recent failures; latest service; latest seen."""
    return (not peer.trusted, peer.failures, -peer.last_served, -peer.last_seen)


class PeerCache:
    """Peers seen, loaded from `path` at construction; `save` writes it back if anything changed.
    News (a new peer, a new address, a peer's first trusted service) is saved at once, the rest
    (service counts, failures) by the next `save` (the transport's, on exit)."""

    def __init__(self, path: os.PathLike | str, *, clock: Callable[[], float], max_peers: int = 64):
        self.path, self.clock, self.max_peers = Path(path), clock, max_peers
        self._peers: dict[str, CachedPeer] = {p.peer_id: p for p in _read(self.path)}
        self._dirty = False

    def __contains__(self, peer_id: str) -> bool:
        return peer_id in self._peers

    def peers(self) -> list[CachedPeer]:
        """Cached peers, best first (`standing`)."""
        return sorted(self._peers.values(), key=standing)

    def remember(self, peer_id: str, addrs: Sequence[str]) -> None:
        """Record that `peer_id` was reached at `addrs`; saves at once if it is news."""
        peer, news = self._merge(peer_id, addrs)
        if peer is None:
            return
        peer.last_seen, peer.failures = self.clock(), 0
        self._settle(peer_id, news)

    def credit(self, peer_id: str, addrs: Sequence[str] = ()) -> None:
        """Record that `peer_id` served us (a generation to the end); a peer not cached is added at
        `addrs`. Saves at once if that makes it trusted."""
        peer, news = self._merge(peer_id, addrs)
        if peer is None:
            return
        news = news or not peer.trusted
        now = self.clock()
        peer.served, peer.last_served, peer.last_seen, peer.failures = peer.served + 1, now, now, 0
        self._settle(peer_id, news)

    def fault(self, peer_id: str) -> None:
        """Record that a dial to `peer_id` or a hop on it failed (cached peers only; saved later)."""
        peer = self._peers.get(peer_id)
        if peer is not None:
            peer.failures += 1
            self._dirty = True

    def forget(self, peer_id: str) -> None:
        if self._peers.pop(peer_id, None) is not None:
            self._dirty = True

    def save(self) -> None:
        """Write the cache atomically if it changed; an I/O error is logged, not raised."""
        if not self._dirty:
            return
        data = {"version": FORMAT_VERSION, "peers": [asdict(p) for p in self.peers()]}
        try:
            with atomic_write(self.path) as file:
                file.write(json.dumps(data, indent=1).encode())
        except OSError as err:
            log.warning("cannot save the peer cache to %s: %s", self.path, err)
            return
        self._dirty = False

    def _merge(self, peer_id: str, addrs: Sequence[str]) -> tuple[CachedPeer | None, bool]:
        """The cached peer with `addrs` merged in (added if new and any address is its own), and
        whether that is news; (None, False) for a new peer without a usable address."""
        addrs = [a for a in addrs if a.endswith(f"/p2p/{peer_id}")][:MAX_ADDRS_PER_PEER]
        known = self._peers.get(peer_id)
        if known is None:
            if not addrs:
                return None, False
            known = self._peers[peer_id] = CachedPeer(peer_id, addrs, self.clock())
            return known, True
        news = not set(addrs) <= set(known.addrs)
        known.addrs = list(dict.fromkeys(addrs + known.addrs))[:MAX_ADDRS_PER_PEER]
        return known, news

    def _settle(self, peer_id: str, news: bool) -> None:
        """After a change to `peer_id`: drop the lowest-ranked peers beyond `max_peers`; save news
        unless `peer_id` itself was dropped (a newcomer to a cache full of better peers)."""
        self._dirty = True
        if len(self._peers) > self.max_peers:
            for dropped in self.peers()[self.max_peers:]:
                del self._peers[dropped.peer_id]
        if news and peer_id in self._peers:
            self.save()


async def rejoin(transport: Transport, cache: PeerCache, *, timeout: float, max_peers: int = 8) -> list[str]:
    """Dial the `max_peers` best cached peers at once, each within `timeout`; the peer ids reached."""
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
        if data.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"unknown version {data.get('version')!r}")
        return [_peer(p) for p in data["peers"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("ignoring unreadable peer cache %s: %s", path, err)
        return []


def _peer(entry: dict) -> CachedPeer:
    """One peer of the file; the service record defaults to none (version 1 had none)."""
    return CachedPeer(str(entry["peer_id"]), [str(a) for a in entry["addrs"]][:MAX_ADDRS_PER_PEER],
                      float(entry["last_seen"]), served=max(0, int(entry.get("served", 0))),
                      last_served=float(entry.get("last_served", 0.0)),
                      failures=max(0, int(entry.get("failures", 0))))
