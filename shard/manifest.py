"""`hearth-manifest.json`: the sha256 of every file of a checkpoint directory, and of every fixed-size
piece of each file, and the model's identity.

Owns writing the manifest (`write_manifest`), reading it (`load_manifest`), checking a file
against it (`Manifest.verify_file`), checking one piece fetched from a peer (`Manifest.check_piece`)
and the model's identity on the wire (`Manifest.digest`, the sha256 of the manifest's canonical
JSON; `identity_manifest` says which manifest that is). Files are hashed in one pass, in 1 MiB
chunks, so a multi-GB shard never sits in memory.

Version 2 (written now): top-level "piece_bytes" (a power of two, 64 KiB to 64 MiB; 4 MiB unless
asked otherwise) and, per file, "pieces": the sha256 of each piece_bytes-long slice of the file in
order (the last one shorter; an empty file has none). Version 1 (no pieces) still loads and still
verifies files, but a model's identity is always the digest of its version-2 manifest: a
directory holding a version-1 manifest is upgraded on first use (`identity_manifest`).

Listed: every regular file under the directory, recursively, by its POSIX path relative to the
directory, following file symlinks (as in a Hugging Face cache snapshot). Not listed: the manifest
itself, and anything inside a directory whose name starts with "." (`.git`, `.cache`: VCS and
download bookkeeping, not model files).
"""

from __future__ import annotations

import hashlib
import json
import logging
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
VERSION = 2  # what this build writes
VERSIONS = (1, 2)  # what it reads
CHUNK_BYTES = 1 << 20  # 1 MiB
PIECE_BYTES = 4 << 20  # 4 MiB: the default piece, and the one every identity is built with
MIN_PIECE_BYTES = 64 << 10
MAX_PIECE_BYTES = 64 << 20
MAX_FILE_BYTES = 1 << 42  # 4 TiB: a bound on any one listed size
MAX_PIECES = 1 << 22  # in all files together: bounds the manifest (about 280 MB of JSON)
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_READ = object()  # identity_manifest's default: read the directory's manifest itself

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileEntry:
    sha256: str  # lowercase hex
    size: int  # bytes; checked before hashing so a truncated file fails fast
    pieces: tuple[str, ...] = ()  # version 2: sha256 hex of each piece, in order; version 1: none


@dataclass(frozen=True)
class Manifest:
    """What a checkpoint directory holds: relative POSIX path -> `FileEntry`."""

    files: Mapping[str, FileEntry] = field(hash=False)
    version: int = VERSION
    piece_bytes: int = PIECE_BYTES  # meaningful in version 2 only

    def to_json(self) -> dict:
        if self.version == 1:
            files = {path: {"sha256": e.sha256, "size": e.size} for path, e in sorted(self.files.items())}
            return {"format": FORMAT, "version": 1, "files": files}
        files = {path: {"sha256": e.sha256, "size": e.size, "pieces": list(e.pieces)}
                 for path, e in sorted(self.files.items())}
        return {"format": FORMAT, "version": self.version, "piece_bytes": self.piece_bytes, "files": files}

    def canonical_bytes(self) -> bytes:
        """Sorted keys, no whitespace, ASCII: the same bytes on every machine."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return text.encode("ascii")

    @cached_property
    def digest(self) -> str:
        """sha256 (hex) of the canonical JSON: the model's identity on the wire (of a version-2
        manifest; `identity_manifest` gives that one)."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    def verify_file(self, model_dir: str | Path, relpath: str | Path) -> FileEntry:
        """Check one file against the manifest (its size, then its sha256: one hash per byte; the
        pieces' hashes come from the same pass when the manifest is built, and each is checked when
        a piece is fetched, `check_piece`); raise `ManifestMismatch` naming it if it differs."""
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

    def piece_count(self, path: str | Path) -> int:
        """How many pieces the manifest lists for the file `path` (0 for an empty file)."""
        return len(self._pieced(path)[1].pieces)

    def piece_span(self, path: str | Path, index: int) -> tuple[int, int]:
        """(offset, length) in bytes of piece `index` of the file `path`."""
        key, entry = self._pieced(path)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(entry.pieces):
            raise ManifestMismatch(key, f"has no piece {index!r} (it has {len(entry.pieces)})")
        offset = index * self.piece_bytes
        return offset, min(self.piece_bytes, entry.size - offset)

    def check_piece(self, path: str | Path, index: int, data: bytes) -> None:
        """Raise `ManifestMismatch` naming the file and the piece unless `data` is exactly piece
        `index` of the file `path` (its length, then its sha256)."""
        key, entry = self._pieced(path)
        _, length = self.piece_span(key, index)
        if len(data) != length:
            raise ManifestMismatch(key, f"piece {index} is {len(data)} bytes, manifest says {length}")
        actual = hashlib.sha256(data).hexdigest()
        if actual != entry.pieces[index]:
            raise ManifestMismatch(key, f"piece {index} has sha256 {actual}, manifest says {entry.pieces[index]}")

    def _pieced(self, path: str | Path) -> tuple[str, FileEntry]:
        key = _relative_key(path)
        entry = self.files.get(key)
        if entry is None:
            raise ManifestMismatch(key, "file is not listed in the manifest")
        if self.version == 1:
            raise ManifestMismatch(key, "a version-1 manifest lists no pieces")
        return key, entry


def hash_file(path: str | Path) -> str:
    """sha256 hex of a file, read in 1 MiB chunks into one reused buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def hash_file_pieces(path: str | Path, piece_bytes: int = PIECE_BYTES) -> FileEntry:
    """The file's sha256, size and piece hashes, from ONE pass over it in 1 MiB chunks read into
    one reused buffer (a chunk that straddles a piece boundary feeds both pieces)."""
    check_piece_bytes(piece_bytes)
    whole = hashlib.sha256()
    piece = hashlib.sha256()
    pieces: list[str] = []
    in_piece = size = 0
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            whole.update(view[:n])
            size += n
            at = 0
            while at < n:
                take = min(n - at, piece_bytes - in_piece)
                piece.update(view[at:at + take])
                at += take
                in_piece += take
                if in_piece == piece_bytes:
                    pieces.append(piece.hexdigest())
                    piece, in_piece = hashlib.sha256(), 0
    if in_piece:
        pieces.append(piece.hexdigest())
    return FileEntry(sha256=whole.hexdigest(), size=size, pieces=tuple(pieces))


def check_piece_bytes(piece_bytes: object) -> int:
    """`piece_bytes` when valid (a power of two from 64 KiB to 64 MiB), else `ValueError`."""
    if (isinstance(piece_bytes, bool) or not isinstance(piece_bytes, int)
            or not MIN_PIECE_BYTES <= piece_bytes <= MAX_PIECE_BYTES or piece_bytes & (piece_bytes - 1)):
        raise ValueError(f"piece_bytes must be a power of two from {MIN_PIECE_BYTES} to {MAX_PIECE_BYTES}, "
                         f"not {piece_bytes!r}")
    return piece_bytes


def pieces_in(size: int, piece_bytes: int) -> int:
    """How many pieces a file of `size` bytes has: ceil(size / piece_bytes)."""
    return -(-size // piece_bytes)


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


def build_manifest(model_dir: str | Path, piece_bytes: int = PIECE_BYTES) -> Manifest:
    """The version-2 manifest of the directory's files as they are now (each read once)."""
    root = Path(model_dir)
    check_piece_bytes(piece_bytes)
    if not root.is_dir():
        raise ManifestMismatch(str(root), "model directory does not exist")
    files = {key: hash_file_pieces(root / key, piece_bytes) for key in list_model_files(root)}
    total = sum(len(entry.pieces) for entry in files.values())
    if total > MAX_PIECES:
        raise ManifestMismatch(str(root), f"would list {total} pieces, more than {MAX_PIECES}: "
                                          f"use pieces larger than {piece_bytes} bytes")
    return Manifest(files, VERSION, piece_bytes)


def save_manifest(model_dir: str | Path, manifest: Manifest) -> Path:
    """Write `manifest` as the directory's `hearth-manifest.json` (atomically); return its path."""
    target = Path(model_dir) / MANIFEST_NAME
    text = json.dumps(manifest.to_json(), indent=1, sort_keys=True) + "\n"
    with atomic_write(target) as file:
        file.write(text.encode("utf-8"))
    return target


def write_manifest(model_dir: str | Path, piece_bytes: int = PIECE_BYTES) -> Path:
    """Hash every file and write `hearth-manifest.json` beside them (atomically); return its path."""
    return save_manifest(model_dir, build_manifest(model_dir, piece_bytes))


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
    version = data.get("version")
    if isinstance(version, bool) or version not in VERSIONS:
        raise CorruptManifest(where, f"has version {version!r}; this build reads {', '.join(map(str, VERSIONS))}")
    piece_bytes = PIECE_BYTES
    if version >= 2:
        piece_bytes = data.get("piece_bytes")
        try:
            check_piece_bytes(piece_bytes)
        except ValueError as err:
            raise CorruptManifest(where, f"has a bad piece_bytes {piece_bytes!r}: {err}") from None
    elif "piece_bytes" in data:
        raise CorruptManifest(where, "is version 1 but has 'piece_bytes'")
    files = data.get("files")
    if not isinstance(files, dict):
        raise CorruptManifest(where, "has no 'files' object")
    entries = {}
    total = 0
    for key, entry in files.items():
        entries[_checked_key(key, where)] = checked = _checked_entry(key, entry, where, version, piece_bytes)
        total += len(checked.pieces)
        if total > MAX_PIECES:
            raise CorruptManifest(where, f"lists more than {MAX_PIECES} pieces")
    return Manifest(entries, version, piece_bytes)


def _checked_key(key: str, where: str) -> str:
    try:
        normal = _relative_key(key)
    except ManifestMismatch as err:
        raise CorruptManifest(where, f"lists a bad path {key!r}: {err.reason}") from err
    if normal != key:
        raise CorruptManifest(where, f"lists a non-canonical path {key!r} (expected {normal!r})")
    return key


def _checked_entry(key: str, entry: object, where: str, version: int, piece_bytes: int) -> FileEntry:
    if not isinstance(entry, dict):
        raise CorruptManifest(where, f"entry for {key!r} is not an object")
    sha, size = entry.get("sha256"), entry.get("size")
    if not isinstance(sha, str) or not _SHA256_HEX.fullmatch(sha):
        raise CorruptManifest(where, f"entry for {key!r} has a bad sha256 {_short(sha)}")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_FILE_BYTES:
        raise CorruptManifest(where, f"entry for {key!r} has a bad size {_short(size)}")
    if version == 1:
        if "pieces" in entry:
            raise CorruptManifest(where, f"entry for {key!r} has 'pieces' in a version-1 manifest")
        return FileEntry(sha256=sha, size=size)
    pieces = entry.get("pieces")
    if not isinstance(pieces, list):
        raise CorruptManifest(where, f"entry for {key!r} has no 'pieces' list")
    expected = pieces_in(size, piece_bytes)
    if len(pieces) != expected:
        raise CorruptManifest(where, f"entry for {key!r} lists {len(pieces)} pieces; {size} bytes in pieces "
                                     f"of {piece_bytes} make {expected}")
    for index, piece in enumerate(pieces):
        if not isinstance(piece, str) or not _SHA256_HEX.fullmatch(piece):
            raise CorruptManifest(where, f"entry for {key!r} has a bad sha256 for piece {index}: {_short(piece)}")
    return FileEntry(sha256=sha, size=size, pieces=tuple(pieces))


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _relative_key(relpath: str | Path) -> str:
    """Canonical manifest key of a path relative to the model directory; refuses escapes."""
    text = str(relpath).replace(os.sep, "/")
    path = PurePosixPath(text)
    if not text or path.is_absolute() or ".." in path.parts or str(path) in ("", "."):
        raise ManifestMismatch(text, "path must be relative and inside the model directory")
    return path.as_posix()


def identity_manifest(model_dir: str | Path, manifest: Manifest | None | object = _READ) -> Manifest:
    """The version-2 manifest whose digest is the model's identity on the wire.

    `manifest`: the directory's, when the caller has read it already. A version-2 manifest is
    itself; with none, the files are hashed (nothing written); a version-1 manifest is upgraded:
    the files are hashed, must agree with it (else `ManifestMismatch` naming the first that does
    not), and the version-2 manifest replaces it on disk (atomically) when the directory is
    writable, so every node and client holding these files computes the same identity.
    """
    if manifest is _READ:
        manifest = load_manifest(model_dir)
    if isinstance(manifest, Manifest) and manifest.version >= 2:
        return manifest
    built = build_manifest(model_dir)
    if manifest is None:
        return built
    assert isinstance(manifest, Manifest)
    for key in sorted(set(manifest.files) | set(built.files)):
        old, new = manifest.files.get(key), built.files.get(key)
        if old is None:
            raise ManifestMismatch(key, "file is not listed in the manifest")
        if new is None:
            raise ManifestMismatch(key, "file is listed in the manifest but missing")
        if (old.sha256, old.size) != (new.sha256, new.size):
            raise ManifestMismatch(key, f"size {new.size} and sha256 {new.sha256} differ from the manifest's "
                                        f"{old.size} and {old.sha256}")
    root = Path(model_dir)
    if os.access(root, os.W_OK):
        try:
            path = save_manifest(root, built)
        except OSError as err:
            log.info("could not upgrade %s to version %d (%s); using it in memory", root / MANIFEST_NAME, VERSION, err)
        else:
            log.info("upgraded %s from version 1 to version %d (pieces of %d bytes)", path, VERSION, built.piece_bytes)
    return built


def model_digest(model_dir: str | Path) -> str:
    """The model's identity on the wire: the digest of its version-2 manifest (`identity_manifest`)."""
    return identity_manifest(model_dir).digest
