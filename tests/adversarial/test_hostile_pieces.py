"""Hostile peers on the pieces protocol (issue 21): a holder that lies about the manifest, one that
sends a piece far larger than asked, and a fetcher asking for files outside the model. Each fails;
honest fetches complete from honest holders and the node keeps serving."""

from __future__ import annotations

import json

import pytest

from mesh.transport import MessageStream
from protocol import (
    PIECES_PROTOCOL, Error, ErrorCode, Hello, ManifestData, ManifestRequest, PieceData, PieceRequest, Role,
)
from shard.piece_store import PieceCache, WholeModel, bitmap
from tests.node.test_pieces_memory import everything, model, swarm  # noqa: F401 (fixtures)

WEIGHTS = "model.safetensors"


def hostile_holder(manifest, *, forged: bytes | None = None, piece_bytes: int = 0):
    """A holder speaking the protocol by hand: it answers the manifest request with `forged` bytes
    (else the real manifest) and every piece request with `piece_bytes` bytes of garbage."""
    async def handle(raw) -> None:
        stream = MessageStream(raw, Role.HOP)
        try:
            while True:
                message = await stream.receive(timeout=5)
                if isinstance(message, Hello):
                    await stream.send(Hello(software="hostile"))
                elif isinstance(message, ManifestRequest):
                    have = tuple(bitmap(set(range(manifest.piece_count(p))), manifest.piece_count(p))
                                 for p in sorted(manifest.files))
                    body = b"" if message.bitmaps_only else (forged or manifest.canonical_bytes())
                    await stream.send(ManifestData(manifest_hash=manifest.digest, manifest=body, have=have))
                elif isinstance(message, PieceRequest):
                    await stream.send(PieceData(manifest_hash=manifest.digest, path=message.path,
                                                index=message.index, data=b"\xff" * piece_bytes), timeout=5)
        except Exception:
            pass
        finally:
            await stream.aclose()
    return handle


async def start_hostile(swarm, name, handle):
    transport = await swarm.transport(name)
    transport.set_handler(PIECES_PROTOCOL, handle)
    swarm.servers[name], swarm.addrs[name] = None, transport.addrs


async def test_a_forged_manifest_is_refused_and_its_sender_banned(swarm, model, tmp_path):  # noqa: F811
    manifest = model.identity
    forged = json.loads(manifest.canonical_bytes())
    first = sorted(forged["files"])[0]
    forged["files"][first]["sha256"] = "0" * 64  # pieces that would verify against the attacker's data
    await start_hostile(swarm, "forger", hostile_holder(manifest, forged=json.dumps(forged).encode()))
    await swarm.holder("honest", WholeModel.of(model))
    fetcher = await swarm.fetcher(manifest.digest)
    assert (await fetcher.manifest()).digest == manifest.digest
    assert "forger" in fetcher.banned and "does not match the digest" in fetcher.banned["forger"]


async def test_a_piece_far_larger_than_asked_is_cut_off_and_fetched_elsewhere(swarm, model, tmp_path):  # noqa: F811
    manifest = model.identity
    await start_hostile(swarm, "flooder", hostile_holder(manifest, piece_bytes=8 * manifest.piece_bytes))
    await swarm.holder("honest", WholeModel.of(model))
    fetcher = await swarm.fetcher(manifest.digest)
    await fetcher.manifest()
    cache = PieceCache.open(tmp_path / "cache", manifest.digest, manifest)
    progress = await fetcher.fetch(cache, everything(manifest))
    assert progress.done == progress.wanted  # every piece from the honest holder
    assert "flooder" in fetcher.failed and "flooder" not in fetcher.banned  # its frame refused by its length
    # prefix (over the piece size), never buffered nor hashed


@pytest.mark.parametrize("path", ["../../../../etc/passwd", "/etc/passwd", "config.json/../../x", "nope.bin"])
async def test_paths_outside_the_model_are_not_read(swarm, model, path):  # noqa: F811
    manifest = model.identity
    server = await swarm.holder("holder", WholeModel.of(model))
    transport = await swarm.transport("asker")
    transport.add_peer_addrs("holder", swarm.addrs["holder"])
    for index in (0, 2**32 - 1):
        stream = MessageStream(await transport.open_stream("holder", PIECES_PROTOCOL, timeout=2), Role.CLIENT)
        assert isinstance(await stream.request(Hello(software="t"), timeout=2), Hello)
        reply = await stream.request(PieceRequest(manifest_hash=manifest.digest, path=path, index=index), timeout=2)
        assert isinstance(reply, Error) and reply.code == ErrorCode.PIECE_NOT_HELD
        await stream.aclose()
    assert server.bytes_sent == 0
