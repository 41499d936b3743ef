"""Downloads: household hosts that join with nothing but the model's digest (issue 21, `[fetch]`).

A model of what `hearth node --model-digest` does (`node.model_fetch`, `mesh.fetch.Fetcher`) and of
what every node does for it (`node.piece_server.PieceServer`), in virtual time, without the bytes:

- **Holders** are the hosts that serve the model now (discovery's records); each holds the pieces it
  has (the seeds and data-center hosts: all of them; a fetched host: what it fetched). A host that
  is still downloading is not announced, so nobody fetches from it, as in the real swarm.
- **The manifest** (`Fetcher.manifest`): every holder found is asked (8 at once) on a stream of its
  own; its answer is the manifest (a sha256 per piece, ~67 bytes each) and its bitmap. No answer
  within `FetchLimits.manifest_timeout_s` (60 s), asking again every 5 s: `FetchFailed`, the node
  exits, and its user restarts it after `[fetch] retry_after` (the pieces it holds stay).
- **The span** is then chosen as every joining host chooses it (`Swarm._choose_span`), and its
  pieces (blocks x block bytes, laid out block after block, cut in `[fetch] piece` pieces) fetched as
  `Fetcher.fetch` does: a worker per stream (`streams_per_peer` per holder, `streams` in all), each
  opening one stream and asking its holder for the next wanted piece it holds that nobody is
  fetching (one of the first four, in order); a holder that refuses or fails is dropped until the
  holders are asked again, which happens when no usable holder has what is still wanted.
- **Uploads** (`PieceServer`): at most `upload_streams` streams uploading pieces at once,
  `upload_streams_per_peer` per fetching peer (more: refused as overloaded, at the first piece
  request; the manifest takes no slot); `upload` bytes per second in all.
- **Transfers** are flows sharing the hosts' access links: a host's uplink (capped by its upload
  limit) is shared equally among its uploads, its downlink among its downloads, and a flow goes at
  the smaller of its two shares (not max-min fair: a share one flow cannot use is not handed to the
  others, which slightly understates throughput where a downlink binds). A request costs a round trip
  before its bytes; opening a stream two (connect, Hello). A piece slower than the request timeout
  (60 s) fails the holder, as the real fetcher's timeout does.

Every draw comes from `random.Random`s seeded by the run's seed, so a run is deterministic.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import trio

from mesh.fetch import FetchLimits
from simulations.stats import percentile, session_summary

MANIFEST_BYTES_PER_PIECE = 67.125  # a quoted sha256 in hex and a comma, and the piece's bit in the bitmap
MANIFEST_BASE_BYTES = 1024
LIMITS = FetchLimits()  # the real fetcher's timeouts


class FetchFailed(Exception):
    """No holder gave the manifest in time (`mesh.fetch.FetchFailed`)."""


class _Failed(Exception):
    """A holder refused, could not be reached or was too slow: dropped from this fetch."""


@dataclass(frozen=True)
class Layout:
    """The model's weight bytes, block after block, cut in pieces (embeddings and head left out)."""

    blocks: int
    block_bytes: int
    piece_bytes: int

    @property
    def total(self) -> int:
        return self.blocks * self.block_bytes

    @property
    def count(self) -> int:
        return math.ceil(self.total / self.piece_bytes)

    def pieces(self, start: int, end: int) -> range:
        """The pieces holding blocks [start, end)."""
        if end <= start:
            return range(0)
        return range(start * self.block_bytes // self.piece_bytes, ((end * self.block_bytes) - 1) // self.piece_bytes + 1)

    def size(self, index: int) -> int:
        return min(self.piece_bytes, self.total - index * self.piece_bytes)

    def manifest_bytes(self) -> int:
        return int(MANIFEST_BASE_BYTES + MANIFEST_BYTES_PER_PIECE * self.count)

    def bitmap_bytes(self) -> int:
        """A `manifest_data` answer to `bitmaps_only`: a bit per piece."""
        return int(MANIFEST_BASE_BYTES + (self.count + 7) // 8)


class _Flow:
    __slots__ = ("src", "dst", "remaining", "rate", "t", "wake")

    def __init__(self, src: str, dst: str, size: float, now: float):
        self.src, self.dst, self.remaining, self.rate, self.t = src, dst, size, 0.0, now
        self.wake = trio.Event()


class Flows:
    """Transfers over the hosts' access links, each at the smaller of its sender's upload share and
    its receiver's download share (see the module's docstring), in virtual time."""

    def __init__(self, up_cap, down_cap):
        self.up_cap, self.down_cap = up_cap, down_cap  # peer -> bytes per second
        self.up: dict[str, list[_Flow]] = defaultdict(list)
        self.down: dict[str, list[_Flow]] = defaultdict(list)

    def _rate(self, f: _Flow) -> float:
        return min(self.up_cap(f.src) / len(self.up[f.src]), self.down_cap(f.dst) / len(self.down[f.dst]))

    def _retime(self, flows: list[_Flow], now: float) -> None:
        for g in flows:
            rate = self._rate(g)
            if rate != g.rate:
                g.remaining = max(0.0, g.remaining - g.rate * (now - g.t))
                g.t, g.rate = now, rate
                g.wake.set()
                g.wake = trio.Event()

    async def transfer(self, src: str, dst: str, size: int) -> None:
        """Move `size` bytes from `src` to `dst`; returns when the last one is there."""
        now = trio.current_time()
        f = _Flow(src, dst, float(size), now)
        self.up[src].append(f)
        self.down[dst].append(f)
        f.rate = self._rate(f)
        self._retime([g for g in (*self.up[src], *self.down[dst]) if g is not f], now)
        try:
            while True:
                wake = f.wake
                with trio.move_on_at(f.t + f.remaining / f.rate):
                    await wake.wait()
                    continue  # its rate changed: wait out what is left at the new rate
                break
        finally:
            self.up[src].remove(f)
            self.down[dst].remove(f)
            self._retime([*self.up[src], *self.down[dst]], trio.current_time())


@dataclass
class HostFetch:
    """One host's fetcher (a `mesh.fetch.Fetcher`, kept across its fetches as the real one is) and its figures."""

    peer_id: str
    rng: random.Random
    arrived: float
    holders: dict[str, frozenset[int] | set[int]] = field(default_factory=dict)  # holder -> pieces it said it holds
    streams: Counter = field(default_factory=Counter)  # open streams per holder
    failed: set[str] = field(default_factory=set)
    have_manifest: bool = False
    attempts: int = 0
    bytes: int = 0  # piece bytes fetched, all fetches (moves included)
    span: tuple[int, int] | None = None  # the span it joined with (its last attempt's)
    span_bytes: int = 0  # that span's bytes
    download_bytes: int = 0  # of them, fetched (not already held from an earlier attempt)
    download_s: float | None = None  # from asking for that span's first piece to holding its last
    up_at: float | None = None
    moves: int = 0  # rebalancing moves, each fetching the new blocks' pieces first


class Downloads:
    """Every host's pieces, uploads and fetches in one run (`World.fetch`, when `[fetch] seeds` > 0)."""

    def __init__(self, world):
        self.world, self.spec = world, world.scenario.fetch
        shape = world.scenario.model
        self.layout = Layout(shape.blocks, int(shape.block_params * self.spec.bytes_per_param), self.spec.piece_bytes)
        self.everything = frozenset(range(self.layout.count))
        self.pieces: dict[str, frozenset[int] | set[int]] = {}  # what each host holds
        self.seeds: set[str] = set()
        self.serving: dict[str, Counter] = defaultdict(Counter)  # uploader -> streams open per fetching peer
        self.hosts: dict[str, HostFetch] = {}
        self.flows = Flows(self._up_cap, self._down_cap)
        self.counts: Counter = Counter()
        self.sent: Counter = Counter()  # piece bytes uploaded per host
        self.coverage_at: dict[int, float] = {}  # 1, 2: when every block was first served that many times

    def _device(self, peer_id: str):
        return self.world.network.hosts[peer_id][1]

    def _up_cap(self, peer_id: str) -> float:
        return min(self._device(peer_id).uplink_mbps * 1e6 / 8, self.spec.upload_bytes_per_s)

    def _down_cap(self, peer_id: str) -> float:
        return self._device(peer_id).downlink_mbps * 1e6 / 8

    def _rtt(self, a: str, b: str) -> float:
        network = self.world.network
        return network.base_link(a, b).latency_s + network.base_link(b, a).latency_s

    # -- holders --------------------------------------------------------------------------------

    def hold_all(self, peer_id: str, *, seed: bool = True) -> None:
        self.pieces[peer_id] = self.everything
        if seed:
            self.seeds.add(peer_id)

    def joining(self, peer_id: str) -> HostFetch:
        if peer_id not in self.hosts:
            self.hosts[peer_id] = HostFetch(peer_id, random.Random(f"{self.world.seed}:fetch:{peer_id}"),
                                            trio.current_time())
            self.pieces[peer_id] = set()
        return self.hosts[peer_id]

    def host_up(self, host) -> None:
        """A host serves (its span's pieces held): note when, and whether coverage reached 1x or 2x."""
        self.check_held(host)
        me = self.hosts.get(host.peer_id)
        if me is not None and me.up_at is None:
            me.up_at = trio.current_time()
            self.world.note_join()
        self.check_coverage()

    def check_coverage(self) -> None:
        lowest = min(self.world.replicas())
        for k in (1, 2):
            if lowest >= k and k not in self.coverage_at:
                self.coverage_at[k] = trio.current_time()
                self.world.trace.record("fetch_coverage", times=k)

    # -- a host's fetcher -----------------------------------------------------------------------

    async def manifest(self, peer_id: str) -> None:
        """`Fetcher.manifest`: the manifest (and the holders' bitmaps) from the hosts serving the model."""
        me = self.joining(peer_id)
        me.attempts += 1
        me.have_manifest = False  # a restarted node asks again
        give_up = trio.current_time() + LIMITS.manifest_timeout_s
        while not await self._ask_manifests(me):
            if trio.current_time() + LIMITS.lookup_every_s > give_up:
                self.counts["fetch_failed_no_manifest"] += 1
                self.world.trace.record("fetch_failed", peer=peer_id)
                raise FetchFailed(f"no peer gave the manifest within {LIMITS.manifest_timeout_s:g} s")
            await trio.sleep(LIMITS.lookup_every_s)
        me.have_manifest = True

    async def _ask_manifests(self, me: HostFetch) -> bool:
        records = await self.world.directory.lookup(self.world.model.digest)
        peers = [r.peer_id for r in records if r.peer_id != me.peer_id and r.peer_id in self.pieces]
        limiter = trio.Semaphore(LIMITS.peers)
        found = []

        async def ask(holder: str) -> None:
            async with limiter:
                try:
                    await self._open(holder, me.peer_id, upload=False)
                    size = self.layout.bitmap_bytes() if me.have_manifest else self.layout.manifest_bytes()
                    with trio.fail_after(LIMITS.request_timeout_s):
                        await trio.sleep(self._rtt(me.peer_id, holder))
                        await self.flows.transfer(holder, me.peer_id, size)
                except (_Failed, trio.TooSlowError):
                    return
                self.counts["manifest_bytes"] += size
                self.counts["manifests"] += 1
                me.holders[holder] = frozenset(self.pieces[holder])  # its bitmap, as of its answer
                me.failed.discard(holder)
                found.append(holder)

        async with trio.open_nursery() as nursery:
            for holder in peers:
                nursery.start_soon(ask, holder)
        return me.have_manifest or bool(found)

    async def download(self, peer_id: str, start: int, end: int, *, move: bool = False) -> None:
        """`Fetcher.fetch` of the pieces of blocks [start, end) the host lacks (for its join, or a move)."""
        me, held = self.hosts[peer_id], self.pieces[peer_id]
        wanted = [p for p in self.layout.pieces(start, end) if p not in held]
        queue, taken = set(wanted), set()
        began, before = trio.current_time(), me.bytes
        self.world.trace.record("fetch_start", peer=peer_id, blocks=[start, end], pieces=len(wanted))
        while queue:
            async with trio.open_nursery() as nursery:
                for holder in self._ready(me, queue):
                    free = self.spec.streams - sum(me.streams.values())
                    for _ in range(min(self.spec.streams_per_peer - me.streams[holder], free)):
                        me.streams[holder] += 1
                        nursery.start_soon(self._worker, me, holder, wanted, queue, taken)
            if queue and not self._ready(me, queue):  # nobody usable holds what is wanted: look again
                await trio.sleep(LIMITS.lookup_every_s)
                await self._ask_manifests(me)
        self.world.trace.record("fetch_done", peer=peer_id, blocks=[start, end])
        if move:
            me.moves += 1
        else:
            me.span, me.download_s, me.download_bytes = (start, end), trio.current_time() - began, me.bytes - before
            me.span_bytes = sum(self.layout.size(p) for p in self.layout.pieces(start, end))

    def check_held(self, host) -> None:
        """The invariant: a host serves only blocks whose pieces it holds."""
        missing = [p for p in self.layout.pieces(*host.span) if p not in self.pieces.get(host.peer_id, ())]
        if missing:
            self.world.violation(f"node {host.peer_id} serves blocks {host.span[0]}:{host.span[1]} without "
                                 f"{len(missing)} of their pieces")

    def _ready(self, me: HostFetch, queue: set[int]) -> list[str]:
        return [h for h, have in me.holders.items() if h not in me.failed and any(p in have for p in queue)]

    async def _worker(self, me: HostFetch, holder: str, wanted: list[int], queue: set[int], taken: set[int]) -> None:
        """`Fetcher._worker`: pieces from `holder` on one stream until it has none left that are wanted, or fails."""
        opened = False
        try:
            while (piece := self._next(me, holder, wanted, queue, taken)) is not None:
                if holder in me.failed:
                    taken.discard(piece)
                    return
                size = self.layout.size(piece)
                try:
                    if not opened:
                        await self._open(holder, me.peer_id)
                        opened = True
                    with trio.fail_after(LIMITS.request_timeout_s):
                        await trio.sleep(self._rtt(me.peer_id, holder))
                        self._reachable(holder, me.peer_id)
                        await self.flows.transfer(holder, me.peer_id, size)
                except (_Failed, trio.TooSlowError) as err:
                    if isinstance(err, trio.TooSlowError):
                        self.counts["request_timeouts"] += 1
                    taken.discard(piece)
                    me.failed.add(holder)
                    return
                queue.discard(piece)
                taken.discard(piece)
                self.pieces[me.peer_id].add(piece)
                me.bytes += size
                self.sent[holder] += size
                self.counts["piece_bytes"] += size
                self.counts["pieces"] += 1
                if holder in self.seeds:
                    self.counts["piece_bytes_from_seeds"] += size
        finally:
            me.streams[holder] -= 1
            if opened:
                self._close(holder, me.peer_id)

    def _next(self, me: HostFetch, holder: str, wanted: list[int], queue: set[int], taken: set[int]) -> int | None:
        """`Fetcher._next`: one of the first four wanted pieces, in order, that `holder` holds and nobody fetches."""
        have, candidates = me.holders.get(holder, ()), []
        for piece in wanted:
            if piece in queue and piece not in taken and piece in have:
                candidates.append(piece)
                if len(candidates) == 4:
                    break
        if not candidates:
            return None
        piece = candidates[me.rng.randrange(len(candidates))]
        taken.add(piece)
        return piece

    # -- a holder's piece server ----------------------------------------------------------------

    def _reachable(self, holder: str, peer: str) -> None:
        network = self.world.network
        if not network.reachable(holder) or network.is_cut(holder, peer):
            raise _Failed(f"{holder} unreachable")

    async def _open(self, holder: str, peer: str, *, upload: bool = True) -> None:
        """A pieces stream to `holder`: connect and Hello (two round trips), or refused as overloaded
        (an upload slot is taken by a stream for pieces; one for the manifest takes none)."""
        network = self.world.network
        if not network.reachable(holder) or network.is_cut(holder, peer):
            self.counts["opens_unreachable"] += 1
            if holder in network.peers and not network.is_down(holder):
                await trio.sleep(LIMITS.open_timeout_s)  # frozen, clogged or cut: a timeout notices
            raise _Failed(f"{holder} unreachable")
        rtt = self._rtt(peer, holder)
        await trio.sleep(rtt)
        serving = self.serving[holder]
        if not upload:
            await trio.sleep(rtt)
            self.counts["opens"] += 1
            return
        if sum(serving.values()) >= self.spec.upload_streams or serving[peer] >= self.spec.upload_streams_per_peer:
            self.counts["opens_refused_overloaded"] += 1
            await trio.sleep(rtt)  # its first piece request is answered with the refusal
            raise _Failed(f"{holder} is uploading to others")
        serving[peer] += 1
        try:
            await trio.sleep(rtt)
        except BaseException:
            self._close(holder, peer)
            raise
        self.counts["opens"] += 1

    def _close(self, holder: str, peer: str) -> None:
        serving = self.serving[holder]
        serving[peer] -= 1
        if serving[peer] <= 0:
            del serving[peer]

    # -- the report -----------------------------------------------------------------------------

    def summary(self, sessions) -> dict:
        def r(value, digits=1):
            return None if value is None else round(value, digits)

        def dist(values):
            return {"count": len(values), "p5": r(percentile(values, 5)), "p50": r(percentile(values, 50)),
                    "p95": r(percentile(values, 95)), "max": r(max(values) if values else None)}

        fetched = [h for h in self.hosts.values() if h.up_at is not None]
        s = self.spec
        first = min((h.arrived for h in self.hosts.values()), default=0.0)
        covered = {f"{k}x_s": r(self.coverage_at.get(k)) for k in (1, 2)}
        after = [x for x in sessions if 1 in self.coverage_at and x.started >= self.coverage_at[1]]
        return {
            "seeds": sorted(self.seeds), "piece_bytes": s.piece_bytes, "upload_bytes_per_s": s.upload_bytes_per_s,
            "block_bytes": self.layout.block_bytes, "model_bytes": self.layout.total, "pieces": self.layout.count,
            "manifest_bytes": self.layout.manifest_bytes(),
            "coverage": {**covered, "first_arrival_s": r(first),
                         "never": [k for k in (1, 2) if k not in self.coverage_at]},
            "hosts": {"joining": len(self.hosts), "serving": len(fetched),
                      "still_fetching": len(self.hosts) - len(fetched),
                      "attempts": sum(h.attempts for h in self.hosts.values())},
            "join_s": dist([h.up_at - h.arrived for h in fetched]),
            "download_s": dist([h.download_s for h in fetched if h.download_s is not None]),
            "span_bytes": dist([h.span_bytes for h in fetched]),
            "bytes": {"pieces": self.counts["piece_bytes"], "from_seeds": self.counts["piece_bytes_from_seeds"],
                      "manifests": self.counts["manifest_bytes"]},
            "moves": {"count": sum(h.moves for h in self.hosts.values()),
                      "bytes": sum(h.bytes - h.download_bytes for h in self.hosts.values())},
            "counts": {k: v for k, v in sorted(self.counts.items()) if "bytes" not in k},
            "top_uploaders": [{"peer": p, "bytes": b} for p, b in self.sent.most_common(5)],
            "sessions_after_coverage": session_summary(after) if after else None,
            "per_host": [{"peer": h.peer_id, "device": self._device(h.peer_id).name, "arrived": r(h.arrived),
                          "attempts": h.attempts, "blocks": list(h.span) if h.span else None, "bytes": h.bytes,
                          "span_bytes": h.span_bytes, "download_bytes": h.download_bytes,
                          "download_s": r(h.download_s, 3), "up_at": r(h.up_at, 3), "moves": h.moves,
                          "downlink_bytes_per_s": self._down_cap(h.peer_id)}
                         for h in self.hosts.values()],
        }
