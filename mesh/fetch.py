"""Fetching a model's pieces from the peers that hold them (`PIECES_PROTOCOL`, issue 21).

`Fetcher` works for one model, named by its digest, into a `shard.piece_store.PieceCache`:

1. **The manifest**, from the peers `find_peers` names (nodes announce themselves under the
   digest, so a DHT lookup lists holders): asked of up to `FetchLimits.peers` at once; the first
   whose bytes hash to the digest is used, every answer's bitmaps say who holds what.
2. **Pieces**, in `fetch(wanted)`: one task per stream (`streams_per_peer` per peer, `streams` in
   all), each taking the next wanted piece its peer holds and nobody is fetching. Every piece is
   checked against the manifest before it is written (`PieceCache.write`); a peer that sends a
   piece that does not match is banned for the rest of this download and the piece fetched
   elsewhere; a peer that fails (a timeout, a closed stream, an error) is dropped and its piece
   goes back in the queue. Holders are looked up again when the wanted pieces have none left.
3. What is already held (a resumed download) is never fetched again.

Every request has `FetchLimits.request_timeout_s`, the whole fetch `deadline_s`. Progress (bytes
done and wanted, bytes per second) goes to a callback after each piece.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from mesh.errors import TransportError
from mesh.swarm_secret import SwarmSecret, proof_of
from mesh.transport import MessageStream, Transport
from protocol.piece_messages import MAX_MANIFEST_BYTES
from protocol import (
    PIECES_PROTOCOL, Codec, Error, Hello, ManifestData, ManifestRequest, PieceData, PieceRequest, ProtocolError, Role,
)
from shard.errors import CorruptManifest, ManifestMismatch, ShardError
from shard.manifest import Manifest, parse_manifest
from shard.piece_store import PieceCache, from_bitmap

log = logging.getLogger("hearth.fetch")

SOFTWARE = "hearth-fetch/0.1"
FRAME_OVERHEAD = 64 << 10  # a reply's fields besides its manifest or piece bytes (the have-bitmaps: far less)


class FetchFailed(ShardError):
    """The model (or some of its pieces) could not be had from any peer; the reason says why."""


@dataclass(frozen=True)
class FetchLimits:
    peers: int = 8  # peers asked for the manifest at once
    streams: int = 8  # piece streams open at once
    streams_per_peer: int = 2
    request_timeout_s: float = 60.0  # one request's answer (a 4 MiB piece at 70 KB/s)
    open_timeout_s: float = 10.0
    manifest_timeout_s: float = 60.0  # to find a peer that has the model at all
    deadline_s: float = 24 * 3600.0  # the whole fetch
    lookup_every_s: float = 5.0  # how often to look for holders while none has what is wanted


@dataclass
class Progress:
    done: int = 0  # bytes of wanted pieces held (fetched now or before)
    wanted: int = 0
    fetched: int = 0  # bytes fetched by this run
    started: float = 0.0
    now: float = 0.0

    @property
    def rate(self) -> float:
        return self.fetched / max(self.now - self.started, 1e-9)


@dataclass
class Holder:
    peer_id: str
    have: dict[str, set[int]] = field(default_factory=dict)
    streams: int = 0


Finder = Callable[[], Awaitable[list[tuple[str, list[str]]]]]  # -> [(peer id, addresses)]


class Fetcher:
    """One model's download from its holders into `cache_root` (see the module's docstring)."""

    def __init__(self, transport: Transport, digest: str, find_peers: Finder, *,
                 limits: FetchLimits = FetchLimits(), on_progress: Callable[[Progress], None] | None = None,
                 swarm: SwarmSecret | None = None):
        self.transport, self.digest, self.find_peers = transport, digest, find_peers
        self.swarm = swarm  # household mode: our Hello proves the secret, as a client's does
        self.limits, self.on_progress = limits, on_progress
        self.holders: dict[str, Holder] = {}
        self.banned: dict[str, str] = {}  # peer -> why (a piece that failed its hash)
        self.failed: set[str] = set()  # peers that failed a request in this fetch
        self.asked: set[str] = set()  # peers asked for the manifest
        self.known: Manifest | None = None  # the manifest, once one matched the digest (then only bitmaps are asked)
        self.cache: PieceCache | None = None
        self.deadline = 0.0

    async def manifest(self) -> Manifest:
        """The model's manifest from its holders, checked against the digest."""
        self.deadline = trio.current_time() + self.limits.deadline_s
        give_up = trio.current_time() + self.limits.manifest_timeout_s
        while True:
            found = await self._ask_manifests()
            if found is not None:
                return found
            if trio.current_time() + self.limits.lookup_every_s > give_up:
                refused = "".join(f"; {peer}: {why}" for peer, why in list(self.banned.items())[:3])
                raise FetchFailed(f"no peer gave the manifest of model {self.digest} within "
                                  f"{self.limits.manifest_timeout_s:g} s (is the digest right? "
                                  f"{len(self.asked)} peers asked{refused})")
            await trio.sleep(self.limits.lookup_every_s)

    async def fetch(self, cache: PieceCache, wanted: dict[str, set[int]]) -> Progress:
        """Fetch every piece of `wanted` (path -> indices) `cache` lacks; FetchFailed when some
        cannot be had before the deadline."""
        self.cache = cache
        todo = cache.missing(wanted)
        progress = Progress(wanted=_bytes(cache.manifest, wanted), started=trio.current_time())
        progress.done = progress.wanted - _bytes(cache.manifest, todo)
        queue = {(path, index) for path, indices in todo.items() for index in indices}
        taken: set[tuple[str, int]] = set()
        try:
            while queue:
                if trio.current_time() > self.deadline:
                    raise FetchFailed(f"{len(queue)} pieces of model {self.digest[:16]}... still missing at the deadline")
                async with trio.open_nursery() as nursery:
                    for holder in self._ready_holders(queue):
                        for _ in range(min(self.limits.streams_per_peer - holder.streams, self._free_streams())):
                            holder.streams += 1
                            nursery.start_soon(self._worker, holder, queue, taken, progress)
                if queue and not self._ready_holders(queue):  # nobody left holds what is wanted: look again
                    await trio.sleep(self.limits.lookup_every_s)
                    await self._ask_manifests()
                    if not self._ready_holders(queue) and trio.current_time() + self.limits.lookup_every_s > self.deadline:
                        path, index = min(queue)
                        raise FetchFailed(f"no reachable peer holds piece {index} of {path!r} of model "
                                          f"{self.digest[:16]}... ({len(queue)} pieces missing)")
        finally:
            cache.save()
        return progress

    def _free_streams(self) -> int:
        return max(0, self.limits.streams - sum(h.streams for h in self.holders.values()))

    def _ready_holders(self, queue: set[tuple[str, int]]) -> list[Holder]:
        usable = [h for h in self.holders.values() if h.peer_id not in self.banned and h.peer_id not in self.failed]
        return [h for h in usable if any(index in h.have.get(path, ()) for path, index in queue)]

    async def _ask_manifests(self) -> Manifest | None:
        """Ask holders (looked up now) for the manifest and their bitmaps; the manifest if one matched."""
        found: list[Manifest] = []
        peers = [(p, a) for p, a in await self.find_peers() if p not in self.banned and p != self.transport.peer_id]
        limiter = trio.Semaphore(self.limits.peers)

        async def ask(peer_id: str, addrs: list[str]) -> None:
            async with limiter:
                self.asked.add(peer_id)
                self.transport.add_peer_addrs(peer_id, addrs)
                try:
                    stream = await self._open(peer_id)
                    try:
                        ask = ManifestRequest(manifest_hash=self.digest, bitmaps_only=self.known is not None)
                        reply = await stream.request(ask, timeout=self.limits.request_timeout_s)
                    finally:
                        await stream.aclose()
                except (TransportError, ProtocolError) as err:
                    log.info("peer %s did not give the manifest: %s", peer_id, err)
                    return
                self._take_manifest(peer_id, reply, found)

        async with trio.open_nursery() as nursery:
            for peer_id, addrs in peers:
                nursery.start_soon(ask, peer_id, addrs)
        return self.known

    def _take_manifest(self, peer_id: str, reply: object, found: list[Manifest]) -> None:
        if isinstance(reply, Error):
            log.info("peer %s has no manifest for us: %s", peer_id, reply.reason)
            return
        if not isinstance(reply, ManifestData):
            return
        if self.known is not None and not reply.manifest:  # asked for the bitmaps only
            self._take_holdings(peer_id, self.known, reply.have)
            return
        if hashlib.sha256(reply.manifest).hexdigest() != self.digest:
            self.banned[peer_id] = "sent a manifest that does not match the digest"
            log.warning("peer %s sent a manifest that does not hash to %s: banned for this download", peer_id, self.digest)
            return
        try:
            manifest = parse_manifest(json.loads(reply.manifest), f"the manifest from {peer_id}")
        except (CorruptManifest, ValueError) as err:
            raise FetchFailed(f"model {self.digest}'s manifest is unusable: {err}") from err
        if manifest.version < 2:
            raise FetchFailed(f"model {self.digest}'s manifest lists no pieces (version 1): its holders must "
                              f"run `hearth manifest` on it")
        self.known = self.known or manifest
        self._take_holdings(peer_id, manifest, reply.have)
        found.append(manifest)

    def _take_holdings(self, peer_id: str, manifest: Manifest, bitmaps: tuple[bytes, ...]) -> None:
        paths = sorted(manifest.files)
        have = {path: from_bitmap(bits, manifest.piece_count(path)) for path, bits in zip(paths, bitmaps)}
        self.holders[peer_id] = Holder(peer_id, have, self.holders.get(peer_id, Holder(peer_id)).streams)
        self.failed.discard(peer_id)

    async def _open(self, peer_id: str) -> MessageStream:
        raw = await self.transport.open_stream(peer_id, PIECES_PROTOCOL, timeout=self.limits.open_timeout_s)
        largest = MAX_MANIFEST_BYTES if self.cache is None else self.cache.manifest.piece_bytes  # what we may be sent
        stream = MessageStream(raw, Role.CLIENT, io_timeout=self.limits.request_timeout_s,
                               max_frame_bytes=largest + FRAME_OVERHEAD)
        try:
            hello = Hello(software=SOFTWARE, codecs=(Codec.FP32,), swarm_proof=proof_of(self.swarm, self.transport.peer_id))
            reply = await stream.request(hello, timeout=self.limits.open_timeout_s)
            if isinstance(reply, Error):
                raise TransportError(f"peer {peer_id} refused: {reply.reason}")
        except BaseException:
            await stream.aclose()
            raise
        return stream

    async def _worker(self, holder: Holder, queue: set[tuple[str, int]], taken: set[tuple[str, int]],
                      progress: Progress) -> None:
        """Fetch pieces from `holder` on one stream until it has none of those left, or fails."""
        stream = None
        try:
            while (piece := self._next(holder, queue, taken)) is not None:
                if holder.peer_id in self.banned or holder.peer_id in self.failed:
                    taken.discard(piece)
                    return
                try:
                    if stream is None:
                        stream = await self._open(holder.peer_id)
                    data = await self._request(stream, *piece)
                except (TransportError, ProtocolError, _NotHeld) as err:
                    taken.discard(piece)
                    if isinstance(err, _NotHeld):
                        holder.have.get(piece[0], set()).discard(piece[1])
                    else:
                        self.failed.add(holder.peer_id)
                    log.info("peer %s failed piece %d of %s: %s", holder.peer_id, piece[1], piece[0], err)
                    return
                try:
                    await trio.to_thread.run_sync(self.cache.write, piece[0], piece[1], data)
                except ManifestMismatch as err:
                    self.banned[holder.peer_id] = f"sent piece {piece[1]} of {piece[0]!r} that fails its hash"
                    log.warning("peer %s sent a corrupt piece (%s): banned for this download", holder.peer_id, err)
                    taken.discard(piece)
                    return
                queue.discard(piece)
                taken.discard(piece)
                progress.done += len(data)
                progress.fetched += len(data)
                progress.now = trio.current_time()
                if self.on_progress is not None:
                    self.on_progress(progress)
        finally:
            holder.streams -= 1
            if stream is not None:
                await stream.aclose()

    def _next(self, holder: Holder, queue: set[tuple[str, int]], taken: set[tuple[str, int]]) -> tuple[str, int] | None:
        """The next piece to ask `holder` for: one it holds and nobody is fetching (rarest holders
        first would need a count per piece; order by file and index keeps reads sequential)."""
        candidates = sorted(piece for piece in queue - taken if piece[1] in holder.have.get(piece[0], ()))
        if not candidates:
            return None
        piece = candidates[secrets.randbelow(min(len(candidates), 4))]  # spread streams over a few pieces
        taken.add(piece)
        return piece

    async def _request(self, stream: MessageStream, path: str, index: int) -> bytes:
        reply = await stream.request(PieceRequest(manifest_hash=self.digest, path=path, index=index),
                                     timeout=self.limits.request_timeout_s)
        if isinstance(reply, Error):
            raise _NotHeld(reply.reason)
        if not isinstance(reply, PieceData) or (reply.path, reply.index) != (path, index):
            raise ProtocolError(f"asked for piece {index} of {path!r}, got {type(reply).__name__}")
        return reply.data


class _NotHeld(Exception):
    """The peer answered a piece request with an error (it does not hold it)."""


def _bytes(manifest: Manifest, pieces: dict[str, set[int]]) -> int:
    return sum(manifest.piece_span(path, index)[1] for path, indices in pieces.items() for index in indices)
