"""Issue 21 in memory: the pieces protocol between `mesh.fetch.Fetcher` and `node.piece_server.PieceServer`
over the in-memory transport, and the cache it fills (`shard.piece_store`): what is fetched is
checked piece by piece, liars and refusals cost a fetch nothing but time, bad input gets a clear error."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import trio

from mesh.fetch import Fetcher, FetchFailed, FetchLimits
from mesh.memory_transport import MemoryNetwork, MemoryTransport
from mesh.transport import MessageStream
from node.piece_server import PieceServer, UploadLimits
from node.sessions import SessionRefused
from protocol import (
    PIECES_PROTOCOL, Error, ErrorCode, Hello, ManifestData, ManifestRequest, PieceData, PieceRequest, Role,
)
from shard.errors import InvalidInput, ManifestMismatch
from shard.manifest import write_manifest
from shard.model_dir import ModelDir
from shard.piece_store import PieceCache, WholeModel, bitmap, from_bitmap

WEIGHTS = "model.safetensors"
FAST = FetchLimits(manifest_timeout_s=1.0, lookup_every_s=0.2, request_timeout_s=5.0, open_timeout_s=2.0)


@pytest.fixture
def model(checkpoint_factory, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(checkpoint_factory("llama"), path)
    write_manifest(path, piece_bytes=64 << 10)
    return ModelDir(path)


def everything(manifest) -> dict[str, set[int]]:
    return {path: set(range(manifest.piece_count(path))) for path in manifest.files}


class Swarm:
    """Holders serving pieces and a fetcher, on one in-memory network."""

    def __init__(self, nursery: trio.Nursery):
        self.nursery, self.network, self.servers, self.addrs = nursery, MemoryNetwork(), {}, {}

    async def transport(self, name: str) -> MemoryTransport:
        async def run(*, task_status=trio.TASK_STATUS_IGNORED):
            async with MemoryTransport.open(self.network, name) as transport:
                task_status.started(transport)
                await trio.sleep_forever()
        return await self.nursery.start(run)

    async def holder(self, name: str, pieces, *, admit=lambda peer, hello: None, tamper=None,
                     limits: UploadLimits = UploadLimits()) -> PieceServer:
        transport = await self.transport(name)
        server = PieceServer(pieces, lambda: Hello(software="test"), admit=admit,
                             stream=lambda raw: MessageStream(raw, Role.HOP), limits=limits, tamper=tamper)
        transport.set_handler(PIECES_PROTOCOL, server.handle)
        self.servers[name], self.addrs[name] = server, transport.addrs
        return server

    async def fetcher(self, digest: str) -> Fetcher:
        transport = await self.transport("fetcher")

        async def find_peers():
            return [(name, self.addrs[name]) for name in self.servers]
        return Fetcher(transport, digest, find_peers, limits=FAST)


@pytest.fixture
async def swarm():
    async with trio.open_nursery() as nursery:
        yield Swarm(nursery)
        nursery.cancel_scope.cancel()


def flip(piece: bytes) -> bytes:
    return bytes([piece[0] ^ 1]) + piece[1:]


async def test_a_fetch_takes_every_piece_checked_and_bans_a_peer_that_sends_a_bad_one(swarm, model, tmp_path):
    manifest = model.identity
    liar = await swarm.holder("liar", WholeModel.of(model), tamper=flip)
    honest = await swarm.holder("honest", WholeModel.of(model))
    fetcher = await swarm.fetcher(manifest.digest)
    assert (await fetcher.manifest()).digest == manifest.digest
    cache = PieceCache.open(tmp_path / "cache", manifest.digest, manifest)
    progress = await fetcher.fetch(cache, everything(manifest))
    assert "liar" in fetcher.banned and progress.done == progress.wanted == sum(e.size for e in manifest.files.values())
    for path in manifest.files:  # byte for byte the holder's files
        assert (tmp_path / "cache" / path).read_bytes() == (model.path / path).read_bytes()
    assert honest.bytes_sent >= progress.wanted - liar.bytes_sent


async def test_a_partial_holder_is_asked_only_for_what_it_holds(swarm, model, tmp_path):
    manifest = model.identity
    partial = PieceCache.open(tmp_path / "partial", manifest.digest, manifest)
    whole = WholeModel.of(model)
    for index in range(3):
        partial.write(WEIGHTS, index, whole.read(WEIGHTS, index))
    await swarm.holder("partial", partial)
    fetcher = await swarm.fetcher(manifest.digest)
    await fetcher.manifest()
    assert fetcher.holders["partial"].have[WEIGHTS] == {0, 1, 2}
    cache = PieceCache.open(tmp_path / "cache", manifest.digest, manifest)
    await fetcher.fetch(cache, {WEIGHTS: {0, 2}})
    assert cache.held(WEIGHTS) == {0, 2} and not fetcher.banned


async def test_a_piece_nobody_holds_is_named_when_the_fetch_gives_up(swarm, model, tmp_path):
    manifest = model.identity
    partial = PieceCache.open(tmp_path / "partial", manifest.digest, manifest)
    await swarm.holder("partial", partial)
    fetcher = await swarm.fetcher(manifest.digest)
    fetcher.limits = FetchLimits(**{**FAST.__dict__, "deadline_s": 1.0})
    await fetcher.manifest()
    with pytest.raises(FetchFailed, match=f"no reachable peer holds piece 4 of '{WEIGHTS}'"):
        await fetcher.fetch(PieceCache.open(tmp_path / "cache", manifest.digest, manifest), {WEIGHTS: {4}})


async def test_a_wrong_digest_and_a_refusing_peer_end_in_one_clear_error(swarm, model):
    def refuse(peer, hello):
        raise SessionRefused(ErrorCode.OVERLOADED, f"peer {peer} is not on this node's allow-list")

    await swarm.holder("private", WholeModel.of(model), admit=refuse)
    await swarm.holder("other", WholeModel.of(model))
    fetcher = await swarm.fetcher("0" * 64)
    with pytest.raises(FetchFailed, match="no peer gave the manifest of model 0{64} within 1 s .*2 peers asked"):
        await fetcher.manifest()


async def test_the_server_refuses_what_it_lacks_and_more_streams_than_allowed(swarm, model):
    manifest = model.identity
    await swarm.holder("holder", WholeModel.of(model), limits=UploadLimits(streams=8, streams_per_peer=1))
    transport = await swarm.transport("asker")
    transport.add_peer_addrs("holder", swarm.addrs["holder"])

    async def open_stream() -> MessageStream:
        stream = MessageStream(await transport.open_stream("holder", PIECES_PROTOCOL, timeout=2), Role.CLIENT)
        assert isinstance(await stream.request(Hello(software="t"), timeout=2), Hello)
        return stream

    stream = await open_stream()
    reply = await stream.request(PieceRequest(manifest_hash=manifest.digest, path="nope.bin", index=0), timeout=2)
    assert isinstance(reply, Error) and reply.code == ErrorCode.PIECE_NOT_HELD and "'nope.bin'" in reply.reason
    await stream.aclose()
    first, second = await open_stream(), await open_stream()
    piece = PieceRequest(manifest_hash=manifest.digest, path=WEIGHTS, index=0)
    assert isinstance(await first.request(piece, timeout=2), PieceData)  # the peer's one upload slot
    reply = await second.request(ManifestRequest(manifest_hash=manifest.digest), timeout=2)
    assert isinstance(reply, ManifestData)  # a manifest takes no slot: always answered
    reply = await second.request(piece, timeout=2)
    assert isinstance(reply, Error) and reply.code == ErrorCode.OVERLOADED and reply.retry_elsewhere
    await first.aclose()


def test_the_cache_keeps_only_pieces_that_check_out(model, tmp_path):
    manifest, whole = model.identity, WholeModel.of(model)
    cache = PieceCache.open(tmp_path / "cache", manifest.digest, manifest)
    with pytest.raises(ManifestMismatch, match="piece 1"):
        cache.write(WEIGHTS, 1, flip(whole.read(WEIGHTS, 1)))
    for index in (0, 1, 2):
        cache.write(WEIGHTS, index, whole.read(WEIGHTS, index))
    cache.save()
    with open(tmp_path / "cache" / WEIGHTS, "r+b") as file:  # a piece damaged on disk after it was recorded
        file.seek(manifest.piece_span(WEIGHTS, 1)[0])
        file.write(b"\0\0\0\0")
    again = PieceCache.open(tmp_path / "cache", manifest.digest)
    assert again.held(WEIGHTS) == {0, 2} and again.missing({WEIGHTS: {0, 1, 2, 3}}) == {WEIGHTS: {1, 3}}
    with pytest.raises(ManifestMismatch, match="digest is"):
        PieceCache.open(tmp_path / "cache", "f" * 64)


def test_a_full_disk_is_named(model, tmp_path, monkeypatch):
    manifest, whole = model.identity, WholeModel.of(model)
    cache = PieceCache.open(tmp_path / "cache", manifest.digest, manifest)

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(InvalidInput, match="no space left on the device holding .*HEARTH_CACHE"):
        cache.write(WEIGHTS, 0, whole.read(WEIGHTS, 0))
    assert cache.held(WEIGHTS) == set()


def test_bitmaps_round_trip_and_ignore_bits_past_the_end():
    assert from_bitmap(bitmap({0, 3, 9}, 10), 10) == {0, 3, 9}
    assert from_bitmap(b"\xff\xff", 10) == set(range(10))


async def test_a_household_holder_serves_only_fetchers_proving_the_secret(swarm, model, tmp_path):
    from mesh.swarm_secret import SwarmSecret, refusal_reason

    secret = SwarmSecret(b"our household's secret, 32 bytes")

    def household(peer, hello):
        if hello is not None and (why := refusal_reason(secret, peer, hello.swarm_proof)):
            raise SessionRefused(ErrorCode.OVERLOADED, why)

    manifest = model.identity
    await swarm.holder("home", WholeModel.of(model), admit=household)
    stranger = await swarm.fetcher(manifest.digest)
    with pytest.raises(FetchFailed, match="no peer gave the manifest"):
        await stranger.manifest()
    member = Fetcher(stranger.transport, manifest.digest, stranger.find_peers, limits=FAST, swarm=secret)
    assert (await member.manifest()).digest == manifest.digest
    cache = PieceCache.open(tmp_path / "cache", manifest.digest, manifest)
    await member.fetch(cache, {WEIGHTS: {0, 1}})
    assert cache.held(WEIGHTS) == {0, 1}
