"""A model's files as pieces (`shard.manifest`): what a device holds, serves, and fills from peers.

Two kinds of holdings share one face, `Pieces`:

- `WholeModel`: a model directory or GGUF file complete on this disk (the user's own copy): it
  holds every piece and reads them from its files.
- `PieceCache`: a directory (`~/.cache/hearth/DIGEST/` by default, `cache_dir`) that a fetch fills:
  `hearth-manifest.json` (the manifest, checked against the digest before it is written), every
  file at its full size with only the fetched pieces written (the rest is a hole: sparse where the
  file system allows), and `.hearth-pieces.json`, the pieces verified so far. A piece is written,
  then recorded; the record is rewritten atomically. On opening, every recorded piece is hashed
  again, so a piece a crash or a power cut left half written is fetched again, never trusted.
  Opened as a model with `verify=False`: its pieces were checked one by one instead.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from typing import Protocol

from shard.atomic_file import atomic_write
from shard.errors import InvalidInput, ManifestMismatch
from shard.gguf_file import IDENTITY_NAME, GGUFModel
from shard.manifest import MANIFEST_NAME, Manifest, parse_manifest
from shard.model_dir import OpenModel

STATE_NAME = ".hearth-pieces.json"
CACHE_ENV = "HEARTH_CACHE"  # overrides ~/.cache/hearth


def cache_dir(digest: str) -> Path:
    """Where a model fetched by its digest lives: $HEARTH_CACHE/DIGEST or ~/.cache/hearth/DIGEST."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hearth"
    return Path(root) / digest


def bitmap(indices: set[int] | range, count: int) -> bytes:
    """Bit i (byte i // 8, least significant first) set for each index in `indices` below `count`."""
    bits = bytearray((count + 7) // 8)
    for index in indices:
        if 0 <= index < count:
            bits[index // 8] |= 1 << (index % 8)
    return bytes(bits)


def from_bitmap(bits: bytes, count: int) -> set[int]:
    """The indices `bitmap` set (those at or past `count` ignored: a peer's bitmap is untrusted)."""
    return {i for i in range(min(count, len(bits) * 8)) if bits[i // 8] >> (i % 8) & 1}


class Pieces(Protocol):
    """Pieces of one model this device can hand out."""

    manifest: Manifest

    def held(self, path: str) -> set[int]:
        """Indices of the pieces of `path` held (and verified)."""

    def read(self, path: str, index: int) -> bytes:
        """The piece's bytes; KeyError when it is not held."""


class WholeModel:
    """A model complete on disk: every piece of every file it lists."""

    def __init__(self, manifest: Manifest, files: dict[str, Path]):
        self.manifest, self.files = manifest, files

    @classmethod
    def of(cls, model: OpenModel) -> WholeModel:
        """An open model's files (a directory's, or the GGUF file under its identity name)."""
        manifest = model.identity
        if isinstance(model, GGUFModel):
            return cls(manifest, {IDENTITY_NAME: model.path})
        return cls(manifest, {path: model.path / path for path in manifest.files})

    def held(self, path: str) -> set[int]:
        return set(range(self.manifest.piece_count(path))) if path in self.files else set()

    def read(self, path: str, index: int) -> bytes:
        if path not in self.files or not 0 <= index < self.manifest.piece_count(path):
            raise KeyError((path, index))
        offset, length = self.manifest.piece_span(path, index)
        return _read_at(self.files[path], offset, length)


class PieceCache:
    """A model being fetched, or fetched: its manifest, its sparse files, its verified pieces."""

    def __init__(self, root: Path, manifest: Manifest, held: dict[str, set[int]]):
        self.root, self.manifest, self._held = root, manifest, held
        self._unsaved = 0
        self._lock = threading.Lock()  # writes come from worker threads, several at once

    @classmethod
    def open(cls, root: str | Path, digest: str, manifest: Manifest | None = None) -> PieceCache:
        """The cache at `root` for the model `digest`: created with `manifest` (checked against the
        digest) when new, else read (and its recorded pieces hashed again)."""
        root = Path(root)
        if manifest is None:
            manifest = _read_manifest(root)
        if manifest.digest != digest:
            raise ManifestMismatch(MANIFEST_NAME, f"digest is {manifest.digest}, expected {digest}")
        try:
            root.mkdir(parents=True, exist_ok=True)
            if not (root / MANIFEST_NAME).exists():
                with atomic_write(root / MANIFEST_NAME) as file:
                    file.write(json.dumps(manifest.to_json(), indent=1, sort_keys=True).encode() + b"\n")
            for path, entry in manifest.files.items():
                target = _inside(root, path)
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists() or target.stat().st_size != entry.size:
                    with open(target, "ab") as file:
                        file.truncate(entry.size)
        except OSError as err:
            raise _disk_error(root, err) from err
        cache = cls(root, manifest, {})
        cache._held = cache._recheck(_read_state(root))
        return cache

    def held(self, path: str) -> set[int]:
        with self._lock:
            return set(self._held.get(path, ()))

    def missing(self, wanted: dict[str, set[int]]) -> dict[str, set[int]]:
        """Of `wanted` (path -> piece indices), what is not held yet."""
        with self._lock:
            left = {path: set(indices) - self._held.get(path, set()) for path, indices in wanted.items()}
        return {path: indices for path, indices in left.items() if indices}

    def read(self, path: str, index: int) -> bytes:
        if index not in self._held.get(path, ()):
            raise KeyError((path, index))
        offset, length = self.manifest.piece_span(path, index)
        return _read_at(_inside(self.root, path), offset, length)

    def write(self, path: str, index: int, data: bytes) -> None:
        """Check `data` against the manifest (ManifestMismatch if it differs), write it in place and
        record it (the record is saved every 16 pieces and by `save`)."""
        self.manifest.check_piece(path, index, data)
        offset, _ = self.manifest.piece_span(path, index)
        try:
            fd = os.open(_inside(self.root, path), os.O_WRONLY)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        except OSError as err:
            raise _disk_error(self.root, err) from err
        with self._lock:
            self._held.setdefault(path, set()).add(index)
            self._unsaved += 1
            if self._unsaved >= 16:
                self._save()

    def save(self) -> None:
        """Record the verified pieces (atomically: the old record or the new, never half of one)."""
        with self._lock:
            self._save()

    def _save(self) -> None:
        state = {"digest": self.manifest.digest, "held": {p: sorted(i) for p, i in sorted(self._held.items())}}
        try:
            with atomic_write(self.root / STATE_NAME) as file:
                file.write(json.dumps(state).encode())
        except OSError as err:
            raise _disk_error(self.root, err) from err
        self._unsaved = 0

    def _recheck(self, recorded: dict[str, list[int]]) -> dict[str, set[int]]:
        """The recorded pieces whose bytes on disk still match the manifest."""
        held: dict[str, set[int]] = {}
        for path, indices in recorded.items():
            if path not in self.manifest.files:
                continue
            for index in indices:
                if not isinstance(index, int) or not 0 <= index < self.manifest.piece_count(path):
                    continue
                offset, length = self.manifest.piece_span(path, index)
                try:
                    self.manifest.check_piece(path, index, _read_at(_inside(self.root, path), offset, length))
                except (ManifestMismatch, OSError):
                    continue
                held.setdefault(path, set()).add(index)
        return held


def _read_manifest(root: Path) -> Manifest:
    try:
        return parse_manifest(json.loads((root / MANIFEST_NAME).read_text()), str(root / MANIFEST_NAME))
    except FileNotFoundError:
        raise InvalidInput(f"{root} holds no fetched model (no {MANIFEST_NAME})") from None
    except (OSError, ValueError) as err:
        raise InvalidInput(f"cannot read {root / MANIFEST_NAME}: {err}") from err


def _read_state(root: Path) -> dict[str, list[int]]:
    """The record of verified pieces; empty when missing or unreadable (they are fetched again)."""
    try:
        state = json.loads((root / STATE_NAME).read_text())
    except (OSError, ValueError):
        return {}
    held = state.get("held") if isinstance(state, dict) else None
    return {p: i for p, i in held.items() if isinstance(p, str) and isinstance(i, list)} if isinstance(held, dict) else {}


def _read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read(length)


def _inside(root: Path, path: str) -> Path:
    """`root / path` for a manifest path (parse_manifest already refused escapes; checked again)."""
    target = (root / path).resolve()
    if root.resolve() not in target.parents:
        raise ManifestMismatch(path, "path leaves the cache directory")
    return target


def _disk_error(root: Path, err: OSError) -> InvalidInput:
    if err.errno == errno.ENOSPC:
        return InvalidInput(f"no space left on the device holding {root}: free some, or set {CACHE_ENV} elsewhere")
    return InvalidInput(f"cannot write the model cache {root}: {err.strerror or err}")
