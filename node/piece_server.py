"""Serving a model's pieces to peers that fetch it (`PIECES_PROTOCOL`, issue 21), read-only and rate-limited.

A node hands out the pieces it holds (`shard.piece_store.Pieces`: its whole model, or the pieces
it fetched itself) to peers that ask: `ManifestRequest` -> `ManifestData` (the manifest's canonical
bytes and a bitmap per file of the pieces held), `PieceRequest` -> `PieceData`, or an `Error`
(`PIECE_NOT_HELD`) for what it lacks. Inference comes first: uploads are limited to
`UploadLimits.streams` streams at once (`streams_per_peer` per peer) and `bytes_per_second` in all
(a token bucket on trio's clock; a stream takes a slot at its first piece request, so a manifest is
always answered), and pieces are read from disk in a worker thread. The same
admission as inference applies (allow-list, household proof): `admit` raises `SessionRefused`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import trio

from mesh.errors import TransportError
from mesh.transport import ByteStream, MessageStream
from node.sessions import SessionRefused
from protocol import (
    Error, ErrorCode, Hello, ManifestData, ManifestRequest, PieceData, PieceRequest, Ping, Pong, ProtocolError,
)
from shard.piece_store import Pieces, bitmap

log = logging.getLogger("hearth.node")


@dataclass(frozen=True)
class UploadLimits:
    bytes_per_second: float = 32 << 20  # pieces sent per second, all peers together
    streams: int = 8  # streams uploading pieces at once (asking for the manifest takes none)
    streams_per_peer: int = 2


class PieceServer:
    """The pieces protocol's node side, over `pieces`."""

    def __init__(self, pieces: Pieces, hello: Callable[[], Hello], *, admit: Callable[[str, Hello | None], None],
                 stream: Callable[[ByteStream], MessageStream], limits: UploadLimits = UploadLimits(),
                 io_timeout: float = 30.0, tamper: Callable[[bytes], bytes] | None = None):
        self.pieces, self.hello, self.admit, self.stream = pieces, hello, admit, stream
        self.tamper = tamper  # `hearth node --chaos corrupt-pieces` (node.chaos): tests of the fetcher's checks
        self.limits, self.io_timeout = limits, io_timeout
        self.serving: Counter[str] = Counter()  # streams open per peer
        self.bytes_sent = 0
        self._tokens, self._refilled = float(limits.bytes_per_second), None

    async def handle(self, raw: ByteStream) -> None:
        stream = self.stream(raw)
        peer = raw.peer_id
        uploading = [False]  # whether this stream holds an upload slot (from its first piece request on)
        try:
            self.admit(peer, None)
            try:
                await self._serve(stream, peer, uploading)
            finally:
                if uploading[0]:
                    self.serving[peer] -= 1
                    if not self.serving[peer]:
                        del self.serving[peer]
        except SessionRefused as err:
            await _refuse(stream, err.code, err.reason, err.retry_elsewhere)
        except ProtocolError as err:
            log.debug("pieces stream from %s sent bad data: %s", peer, err)
            await _refuse(stream, err.code, str(err), False)
        except TransportError as err:
            log.debug("pieces stream from %s ended: %s", peer, err)
        finally:
            await stream.aclose()

    def _take_slot(self, peer: str, uploading: list[bool]) -> None:
        """An upload slot for this stream, at its first piece request (a manifest costs none)."""
        if uploading[0]:
            return
        if sum(self.serving.values()) >= self.limits.streams or self.serving[peer] >= self.limits.streams_per_peer:
            raise SessionRefused(ErrorCode.OVERLOADED, "this node is uploading to others: fetch elsewhere",
                                 retry_elsewhere=True)
        self.serving[peer] += 1
        uploading[0] = True

    async def _serve(self, stream: MessageStream, peer: str, uploading: list[bool]) -> None:
        manifest = self.pieces.manifest
        while True:
            message = await stream.receive(timeout=self.io_timeout)
            if isinstance(message, Ping):
                await stream.send(Pong(nonce=message.nonce))
            elif isinstance(message, Hello):
                self.admit(peer, message)
                await stream.send(self.hello())
            elif isinstance(message, (ManifestRequest, PieceRequest)) and message.manifest_hash != manifest.digest:
                raise SessionRefused(ErrorCode.PIECE_NOT_HELD, f"this node holds model {manifest.digest[:16]}..., "
                                     f"not {message.manifest_hash[:16]}...", retry_elsewhere=True)
            elif isinstance(message, ManifestRequest):
                have = tuple(bitmap(self.pieces.held(path), manifest.piece_count(path)) for path in sorted(manifest.files))
                await stream.send(ManifestData(manifest_hash=manifest.digest, have=have,
                                               manifest=b"" if message.bitmaps_only else manifest.canonical_bytes()))
            elif isinstance(message, PieceRequest):
                self._take_slot(peer, uploading)
                data = await self._read(message.path, message.index)
                if self.tamper is not None:
                    data = self.tamper(data)
                await self._pace(len(data))
                await stream.send(PieceData(manifest_hash=manifest.digest, path=message.path, index=message.index,
                                            data=data))
                self.bytes_sent += len(data)
            else:
                raise SessionRefused(ErrorCode.UNEXPECTED_MESSAGE,
                                     f"{type(message).__name__} is not allowed on a pieces stream")

    async def _read(self, path: str, index: int) -> bytes:
        try:
            return await trio.to_thread.run_sync(self.pieces.read, path, index)
        except KeyError:
            raise SessionRefused(ErrorCode.PIECE_NOT_HELD, f"this node does not hold piece {index} of {path!r}",
                                 retry_elsewhere=True) from None
        except OSError as err:
            raise SessionRefused(ErrorCode.INTERNAL_ERROR, f"cannot read piece {index} of {path!r}",
                                 retry_elsewhere=True) from err

    async def _pace(self, size: int) -> None:
        """Wait until the upload budget covers `size` bytes (a token bucket holding one second's worth)."""
        rate = self.limits.bytes_per_second
        now = trio.current_time()
        if self._refilled is not None:
            self._tokens = min(rate, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        self._tokens -= size
        if self._tokens < 0:
            await trio.sleep(-self._tokens / rate)


async def _refuse(stream: MessageStream, code: ErrorCode, reason: str, retry_elsewhere: bool) -> None:
    try:
        await stream.send(Error(code=code, reason=reason, retry_elsewhere=retry_elsewhere), timeout=2.0)
    except (TransportError, ProtocolError):
        pass
