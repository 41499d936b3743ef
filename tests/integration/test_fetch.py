"""Issue 21 on real processes: nodes and a client with nothing but the model's digest fetch exactly
what they need from the swarm, checked piece by piece, and then serve and answer as usual."""

from __future__ import annotations

import json
import shutil
import signal
import sys

import trio

from node.model_fetch import pieces_of
from node.swarm import LocalSwarm
from shard.errors import InvalidInput
from shard.manifest import write_manifest
from shard.model_dir import ModelDir
from shard.model_ranges import needed_ranges
from shard.piece_store import PieceCache
from tests.integration.conftest import NODE_ARGS, local_tokens, run_command
from tests.integration.test_auto_span import KV_BYTES, memory_for

PROMPT = [5, 17, 33, 2, 9, 71, 4]
WEIGHTS = "model.safetensors"


def held_now(cache_dir, digest) -> set[int]:
    """The weights' pieces a fetching node has verified so far (none before its manifest is in)."""
    try:
        return PieceCache.open(cache_dir, digest).held(WEIGHTS)
    except InvalidInput:
        return set()


def small_pieced_model(checkpoint_factory, tmp_path):
    """The tiny llama with pieces of 64 KiB (its blocks span several), and its digest."""
    model = tmp_path / "model"
    shutil.copytree(checkpoint_factory("llama"), model)
    write_manifest(model, piece_bytes=64 << 10)
    return model, ModelDir(model).digest


async def test_empty_nodes_fetch_only_their_blocks_serve_them_and_clients_fetch_what_they_run(checkpoint_factory,
                                                                                             tmp_path):
    model, digest = small_pieced_model(checkpoint_factory, tmp_path)
    source = ModelDir(model)
    async with LocalSwarm(model, extra_args=NODE_ARGS, work_dir=tmp_path) as swarm:
        holder = await swarm.add(0, 2)  # the one device with the files
        await holder.wait_ready()
        spans = [(0, 2), (2, 4), (4, 6)]
        empty = [await swarm.add(a, b, digest=digest) for a, b in spans[:2]]
        for node in empty:
            await node.wait_ready(120)
        # the third has no --blocks: it chooses once the manifest and config are in (blocks 4:6, the
        # only ones nobody serves), then fetches just those
        empty.append(await swarm.add(None, None, digest=digest, extra_args=[
            "--memory", memory_for(model, 2), "--kv-cache-bytes", str(KV_BYTES)]))
        await empty[2].wait_ready(120)
        assert await empty[2].wait_for("chose blocks 4:6", 5)
        for node, (a, b) in zip(empty, spans):
            cache = PieceCache.open(tmp_path / f"{node.name}.cache", digest)
            wanted = pieces_of(source.identity, needed_ranges(source, a, b))
            assert cache.held(WEIGHTS) == wanted[WEIGHTS]  # its own blocks (and the header), nothing more
            assert len(wanted[WEIGHTS]) < 0.6 * source.identity.piece_count(WEIGHTS)
        client_cache = tmp_path / "client.cache"
        done = await run_command([
            sys.executable, "-m", "node.cli", "generate", "--model-digest", digest, "--cache-dir", str(client_cache),
            "--bootstrap", empty[1].addr, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "8",
            "--codec", "fp32", "--json"])
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert answer["token_ids"] == local_tokens(model, PROMPT, 8)
        assert {hop["peer_id"] for hop in answer["route"] if hop["start"] >= 2} <= {empty[1].peer_id, empty[2].peer_id}
        head = PieceCache.open(client_cache, digest).held(WEIGHTS)
        assert head == pieces_of(source.identity, needed_ranges(source, 0, 1, head=True))[WEIGHTS]
        whole = await run_command([  # `hearth run` fetches every piece, then runs here
            sys.executable, "-m", "node.cli", "run", "--model-digest", digest, "--cache-dir", str(tmp_path / "run.cache"),
            "--bootstrap", holder.addr, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "8", "--json"])
        assert whole.returncode == 0, whole.stderr
        assert json.loads(whole.stdout)["token_ids"] == answer["token_ids"]
        assert (tmp_path / "run.cache" / WEIGHTS).read_bytes() == (model / WEIGHTS).read_bytes()


async def test_a_peer_serving_corrupt_pieces_is_caught_and_the_fetch_completes_elsewhere(checkpoint_factory,
                                                                                          tmp_path):
    """First the only holder flips a byte in every piece it sends: the fetcher bans it and waits;
    then an honest holder joins and the fetch completes from it, every piece checking out."""
    model, digest = small_pieced_model(checkpoint_factory, tmp_path)
    source = ModelDir(model)
    async with LocalSwarm(model, extra_args=NODE_ARGS, work_dir=tmp_path) as swarm:
        liar = await swarm.add(0, 6, extra_args=["--chaos", "corrupt-pieces"])
        await liar.wait_ready()
        fetcher = await swarm.add(2, 4, digest=digest)
        await fetcher.wait_for("fetching the manifest", 60)
        honest = await swarm.add(0, 6)
        await honest.wait_ready()
        await fetcher.wait_ready(120)
        summary = next(line for line in fetcher.lines if line.startswith("blocks 2:4: fetched"))
        assert "(1 peers banned for bad pieces)" in summary
        cache = PieceCache.open(tmp_path / f"{fetcher.name}.cache", digest)  # every held piece hashed again
        assert cache.held(WEIGHTS) == pieces_of(source.identity, needed_ranges(source, 2, 4))[WEIGHTS]


async def test_a_fetch_killed_midway_resumes_without_fetching_verified_pieces_again(checkpoint_factory, tmp_path):
    model, digest = small_pieced_model(checkpoint_factory, tmp_path)
    pieces = ModelDir(model).identity.piece_count(WEIGHTS)
    async with LocalSwarm(model, extra_args=NODE_ARGS, work_dir=tmp_path) as swarm:
        holder = await swarm.add(0, 6, extra_args=["--max-upload", "0.25"])  # 256 KiB/s: seconds for the blocks
        await holder.wait_ready()
        first = await swarm.add(0, 6, digest=digest)
        cache_dir = tmp_path / f"{first.name}.cache"
        with trio.fail_after(60):
            while len(held_now(cache_dir, digest)) < 4:  # some pieces verified and recorded
                await trio.sleep(0.2)
        first.signal(signal.SIGKILL)
        await first.wait(10)
        kept = PieceCache.open(cache_dir, digest).held(WEIGHTS)
        assert 4 <= len(kept) < pieces
        again = await swarm.add(0, 6, digest=digest, extra_args=["--cache-dir", str(cache_dir)])
        await again.wait_ready(120)
        summary = next(line for line in again.lines if line.startswith("blocks 0:6: fetched"))
        here = int(summary.split(", ")[1].split()[0])
        assert here >= (len(kept) - 1) * (64 << 10)  # what the first run verified was not fetched again
        source = ModelDir(model)
        assert PieceCache.open(cache_dir, digest).held(WEIGHTS) == pieces_of(source.identity,
                                                                             needed_ranges(source, 0, 6))[WEIGHTS]
