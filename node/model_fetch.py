"""A model from the swarm, by its digest: what `--model-digest` does before a node or client starts.

`FetchedModel` fills the model's `shard.piece_store.PieceCache` from the peers that hold it
(`mesh.fetch.Fetcher`) in two rounds, and opens it as a model:

1. `FetchedModel.open`: what every user of the model opens: the manifest (checked against the digest), every file that
   is not weights (config, tokenizer, the sharded index) whole, and the headers of the weight
   files (a safetensors file's length-prefixed JSON; a GGUF file's header, metadata and tensor
   index, fetched piece by piece until `shard.gguf_format.data_start` finds their end);
2. `FetchedModel.ensure`: the tensors this device needs (`shard.model_ranges.needed_ranges`): blocks [start, end) for a
   node, the head (embeddings, final norm, LM head, tokenizer) for a client.

A rerun resumes: verified pieces stay. The fetched model opens without the whole-file check
(`open_fetched`): its pieces were each checked against the manifest instead.
"""

from __future__ import annotations

import argparse
import re
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import trio

from mesh.client import ClientOptions
from mesh.discovery import Discovery
from mesh.join import joined
from mesh.fetch import Fetcher, FetchFailed, FetchLimits, Progress
from mesh.swarm_secret import SwarmSecret
from mesh.transport import Transport
from shard.errors import InvalidInput
from shard.gguf_file import IDENTITY_NAME, GGUFModel
from shard.gguf_format import data_start
from shard.manifest import Manifest
from shard.model_dir import ModelDir, OpenModel
from shard.model_ranges import needed_ranges
from shard.piece_store import PieceCache, cache_dir

WEIGHT_SUFFIXES = (".safetensors", ".gguf")
MAX_HEADER_BYTES = 256 << 20  # a header this long is not a model's: refuse rather than fetch on


def open_fetched(cache: PieceCache) -> OpenModel:
    """The cache as a model: a GGUF file or a directory, with the fetched manifest as its identity."""
    if set(cache.manifest.files) == {IDENTITY_NAME}:
        model: OpenModel = GGUFModel(cache.root / IDENTITY_NAME)
    else:
        model = ModelDir(cache.root, verify=False)
    model.__dict__["manifest"] = cache.manifest  # its pieces were verified one by one; no whole-file hashing
    return model


class FetchedModel:
    """A model being fetched into its cache: `open` gets what every user needs, `ensure` the pieces
    of a span (or the head) before they are loaded; `model` opens what is there."""

    def __init__(self, fetcher: Fetcher, cache: PieceCache):
        self.fetcher, self.cache = fetcher, cache
        self.last = Progress()  # what the last `ensure` fetched and found already here

    @classmethod
    async def open(cls, transport: Transport, discovery: Discovery, digest: str, *, root: Path | None = None,
                   limits: FetchLimits = FetchLimits(), on_progress: Callable[[Progress], None] | None = None,
                   swarm: SwarmSecret | None = None) -> FetchedModel:
        """The manifest from the swarm, checked against `digest`; the files that are not weights and
        the weight files' headers. FetchFailed when the swarm cannot provide them."""
        async def find_peers() -> list[tuple[str, list[str]]]:
            return [(record.peer_id, list(record.addrs)) for record in await discovery.lookup(digest)]

        fetcher = Fetcher(transport, digest, find_peers, limits=limits, on_progress=on_progress, swarm=swarm)
        manifest = await fetcher.manifest()
        cache = await trio.to_thread.run_sync(lambda: PieceCache.open(root or cache_dir(digest), digest, manifest))
        await fetcher.fetch(cache, _whole_small_files(manifest))
        await _fetch_headers(fetcher, cache)
        return cls(fetcher, cache)

    def model(self) -> OpenModel:
        return open_fetched(self.cache)

    async def ensure(self, start: int, end: int, *, head: bool = False) -> OpenModel:
        """Fetch what loading blocks [start, end) (and with `head` the client's head) reads; the model."""
        model = await trio.to_thread.run_sync(self.model)
        ranges = await trio.to_thread.run_sync(lambda: needed_ranges(model, start, end, head=head))
        self.last = await self.fetcher.fetch(self.cache, pieces_of(self.cache.manifest, ranges))
        return model


async def fetch_client_model(transport: Transport, discovery: Discovery, digest: str, options: ClientOptions, *,
                             root: Path | None = None) -> OpenModel:
    """What a client of the model `digest` runs, fetched: the head, the tokenizer and, unless it
    runs no block itself, the first block (auto may run one)."""
    fetched = await FetchedModel.open(transport, discovery, digest, root=root, swarm=options.swarm_secret,
                                      on_progress=print_progress("the model's headers"))
    fetched.fetcher.on_progress = print_progress("the client's head")
    local = options.local_blocks if isinstance(options.local_blocks, int) else 1
    return await fetched.ensure(0, local, head=True)


async def fetch_whole_model(bootstrap: list[str], digest: str, root: Path | None) -> OpenModel:
    """Every piece of the model `digest` (`hearth run --model-digest`): joins through `bootstrap`."""
    async with joined(bootstrap=bootstrap, wall_clock=time.time, require_peers=True) as (transport, discovery):
        fetched = await FetchedModel.open(transport, discovery, digest, root=root,
                                          on_progress=print_progress("the model's headers"))
        fetched.fetcher.on_progress = print_progress("the whole model")
        await fetched.fetcher.fetch(fetched.cache, {path: set(range(fetched.cache.manifest.piece_count(path)))
                                                    for path in fetched.cache.manifest.files})
        return fetched.model()


def check_digest_arguments(args: argparse.Namespace) -> None:
    """--model-digest is 64 hex digits; --cache-dir goes with it."""
    digest = getattr(args, "model_digest", None)
    if digest is not None and not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise InvalidInput(f"--model-digest must be the 64 hex digits `hearth manifest` prints, got {digest!r}")
    if getattr(args, "cache_dir", None) is not None and digest is None:
        raise InvalidInput("--cache-dir is for --model-digest")


def pieces_of(manifest: Manifest, ranges: dict[str, list[tuple[int, int]]]) -> dict[str, set[int]]:
    """The pieces that hold `ranges` (path -> (offset, length) list)."""
    size = manifest.piece_bytes
    return {path: {index for offset, length in spans if length
                   for index in range(offset // size, (offset + length - 1) // size + 1)}
            for path, spans in ranges.items() if path in manifest.files}


def _whole_small_files(manifest: Manifest) -> dict[str, set[int]]:
    return {path: set(range(manifest.piece_count(path))) for path in manifest.files
            if not path.endswith(WEIGHT_SUFFIXES)}


async def _fetch_headers(fetcher: Fetcher, cache: PieceCache) -> None:
    """Each weight file's header: a safetensors file's 8-byte length and JSON, a GGUF file's header,
    metadata and tensor index (piece by piece until their end is found)."""
    manifest = cache.manifest
    for path, entry in sorted(manifest.files.items()):
        if not path.endswith(WEIGHT_SUFFIXES) or not entry.size:
            continue
        count, pieces = 1, manifest.piece_count(path)
        while True:
            await fetcher.fetch(cache, {path: set(range(count))})
            end = await trio.to_thread.run_sync(_header_end, cache, path, entry.size, count)
            if end is not None:
                break
            if count >= pieces or count * manifest.piece_bytes >= MAX_HEADER_BYTES:
                raise FetchFailed(f"{path} of model {manifest.digest[:16]}... has no readable header in its "
                                  f"first {count * manifest.piece_bytes} bytes")
            count += 1
        if end > MAX_HEADER_BYTES:
            raise FetchFailed(f"{path} of model {manifest.digest[:16]}... declares a {end}-byte header")
        await fetcher.fetch(cache, pieces_of(manifest, {path: [(0, end)]}))


def _header_end(cache: PieceCache, path: str, size: int, count: int) -> int | None:
    """The end of `path`'s header, read from its first `count` pieces (held), or None: fetch more."""
    prefix = b"".join(cache.read(path, index) for index in range(count))
    if path.endswith(".safetensors"):
        return min(size, 8 + struct.unpack("<Q", prefix[:8])[0]) if len(prefix) >= 8 else None
    return data_start(prefix, size)


def print_progress(what: str) -> Callable[[Progress], None]:
    """A progress line on stderr, rewritten in place: percent, bytes, rate and time left."""
    def show(progress: Progress) -> None:
        rate = progress.rate
        left = (progress.wanted - progress.done) / rate if rate > 0 else float("inf")
        eta = f"{left:.0f} s left" if left != float("inf") else "--"
        share = progress.done / progress.wanted if progress.wanted else 1.0
        sys.stderr.write(f"\rfetching {what}: {share:6.1%} of {progress.wanted / 2**20:.1f} MiB, "
                         f"{rate / 2**20:.1f} MiB/s, {eta}   ")
        if progress.done >= progress.wanted:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show
