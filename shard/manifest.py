"""`hearth-manifest.json`: the sha256 of every file of a checkpoint directory, and its identity.

Owns writing the manifest (`write_manifest`), reading it (`load_manifest`), checking a file
against it (`Manifest.verify_file`) and the model's identity on the wire (`Manifest.digest`, the
sha256 of the manifest's canonical JSON). Files are hashed in 1 MiB chunks, so a multi-GB shard
never sits in memory.

Listed: every regular file under the directory, recursively, by its POSIX path relative to the
directory, following file symlinks (as in a Hugging Face cache snapshot). Not listed: the manifest
itself, and anything inside a directory whose name starts with "." (`.git`, `.cache`: VCS and
download bookkeeping, not model files).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath

from shard.atomic_file import atomic_write
from shard.errors import CorruptManifest, ManifestMismatch

MANIFEST_NAME = "hearth-manifest.json"
FORMAT = "hearth-manifest"
VERSION = 1
CHUNK_BYTES = 1 << 20  # 1 MiB
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FileEntry:
    sha256: str  # lowercase hex
    size: int  # bytes; checked before hashing so a truncated file fails fast


@dataclass(frozen=True)
class Manifest:
    """What a checkpoint directory holds: relative POSIX path -> `FileEntry`."""

    files: Mapping[str, FileEntry] = field(hash=False)
    version: int = VERSION

    def to_json(self) -> dict:
        files = {path: {"sha256": e.sha256, "size": e.size} for path, e in sorted(self.files.items())}
        return {"format": FORMAT, "version": self.version, "files": files}

    def canonical_bytes(self) -> bytes:
        """Sorted keys, no whitespace, ASCII: the same bytes on every machine."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return text.encode("ascii")

    @cached_property
    def digest(self) -> str:
        """sha256 (hex) of the canonical JSON: the model's identity on the wire."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    def verify_file(self, model_dir: str | Path, relpath: str | Path) -> FileEntry:
        """Check one file against the manifest; raise `ManifestMismatch` naming it if it differs."""
        key = _relative_key(relpath)
        entry = self.files.get(key)
        if entry is None:
            raise ManifestMismatch(key, "file is not listed in the manifest")
        path = Path(model_dir) / key
        try:
            size = path.stat().st_size
        except FileNotFoundError as err:
            raise ManifestMismatch(key, "file is listed in the manifest but missing") from err
        if size != entry.size:
            raise ManifestMismatch(key, f"size is {size} bytes, manifest says {entry.size}")
        actual = hash_file(path)
        if actual != entry.sha256:
            raise ManifestMismatch(key, f"sha256 is {actual}, manifest says {entry.sha256}")
        return entry

    def verify_all(self, model_dir: str | Path) -> None:
        """Check every listed file, and that the directory holds no file the manifest lacks."""
        for key in sorted(self.files):
            self.verify_file(model_dir, key)
        unlisted = sorted(set(list_model_files(model_dir)) - set(self.files))
        if unlisted:
            reason = f"file is not listed in the manifest ({len(unlisted)} such)"
            raise ManifestMismatch(unlisted[0], reason)


def hash_file(path: str | Path) -> str:
    """sha256 hex of a file, read in 1 MiB chunks into one reused buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def list_model_files(model_dir: str | Path) -> list[str]:
    """Relative POSIX paths of the files a manifest lists, sorted."""
    root = Path(model_dir)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath) / name
            key = path.relative_to(root).as_posix()
            if key == MANIFEST_NAME or name.startswith(f".{MANIFEST_NAME}") or not path.is_file():
                continue
            found.append(key)
    return sorted(found)


def build_manifest(model_dir: str | Path) -> Manifest:
    root = Path(model_dir)
    if not root.is_dir():
        raise ManifestMismatch(str(root), "model directory does not exist")
    files = {}
    for key in list_model_files(root):
        path = root / key
        files[key] = FileEntry(sha256=hash_file(path), size=path.stat().st_size)
    return Manifest(files)


def write_manifest(model_dir: str | Path) -> Path:
    """Hash every file and write `hearth-manifest.json` beside them (atomically); return its path."""
    manifest = build_manifest(model_dir)
    target = Path(model_dir) / MANIFEST_NAME
    text = json.dumps(manifest.to_json(), indent=1, sort_keys=True) + "\n"
    with atomic_write(target) as file:
        file.write(text.encode("utf-8"))
    return target


def load_manifest(model_dir: str | Path) -> Manifest | None:
    """The directory's manifest, or None when it has none; `CorruptManifest` when unreadable."""
    path = Path(model_dir) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise CorruptManifest(str(path), f"cannot be read ({err})") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CorruptManifest(str(path), f"is not valid JSON ({err})") from err
    return parse_manifest(data, str(path))


def parse_manifest(data: object, where: str = MANIFEST_NAME) -> Manifest:
    """Validate decoded manifest JSON; every problem raises `CorruptManifest` naming `where`."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CorruptManifest(where, f"is not a {FORMAT} object")
    if data.get("version") != VERSION:
        raise CorruptManifest(where, f"has version {data.get('version')!r}; this build reads {VERSION}")
    files = data.get("files")
    if not isinstance(files, dict):
        raise CorruptManifest(where, "has no 'files' object")
    entries = {}
    for key, entry in files.items():
        entries[_checked_key(key, where)] = _checked_entry(key, entry, where)
    return Manifest(entries)


def _checked_key(key: str, where: str) -> str:
    try:
        normal = _relative_key(key)
    except ManifestMismatch as err:
        raise CorruptManifest(where, f"lists a bad path {key!r}: {err.reason}") from err
    if normal != key:
        raise CorruptManifest(where, f"lists a non-canonical path {key!r} (expected {normal!r})")
    return key


def _checked_entry(key: str, entry: object, where: str) -> FileEntry:
    if not isinstance(entry, dict):
        raise CorruptManifest(where, f"entry for {key!r} is not an object")
    sha, size = entry.get("sha256"), entry.get("size")
    if not isinstance(sha, str) or not _SHA256_HEX.fullmatch(sha):
        raise CorruptManifest(where, f"entry for {key!r} has a bad sha256 {sha!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise CorruptManifest(where, f"entry for {key!r} has a bad size {size!r}")
    return FileEntry(sha256=sha, size=size)


def _relative_key(relpath: str | Path) -> str:
    """Canonical manifest key of a path relative to the model directory; refuses escapes."""
    text = str(relpath).replace(os.sep, "/")
    path = PurePosixPath(text)
    if not text or path.is_absolute() or ".." in path.parts or str(path) in ("", "."):
        raise ManifestMismatch(text, "path must be relative and inside the model directory")
    return path.as_posix()


def model_digest(model_dir: str | Path) -> str:
    """The model's identity on the wire: its manifest's digest (hashing the files if it has none)."""
    manifest = load_manifest(model_dir)
    return (manifest if manifest is not None else build_manifest(model_dir)).digest
