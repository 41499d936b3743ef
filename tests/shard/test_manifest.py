"""hearth-manifest.json: write, load, verify, digest, and every way a file or manifest can be wrong."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest

from shard import manifest as manifest_module
from shard.errors import CorruptManifest, ManifestMismatch, ShardError
from shard.manifest import (
    MANIFEST_NAME,
    PIECE_BYTES,
    FileEntry,
    Manifest,
    build_manifest,
    hash_file,
    hash_file_pieces,
    identity_manifest,
    list_model_files,
    load_manifest,
    parse_manifest,
    write_manifest,
)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    rng = random.Random(0)
    root = tmp_path / "model"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "model-00001-of-00002.safetensors").write_bytes(rng.randbytes(3 * 1024 * 1024 + 17))
    (root / "model-00002-of-00002.safetensors").write_bytes(rng.randbytes(1000))
    (root / "empty.txt").write_bytes(b"")
    (root / "sub" / "deeper" / "tokenizer.json").write_text('{"ü": 1}', encoding="utf-8")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return root


def test_write_lists_every_file_recursively_with_sha256(model_dir: Path) -> None:
    path = write_manifest(model_dir)
    assert path == model_dir / MANIFEST_NAME
    manifest = load_manifest(model_dir)
    assert manifest is not None
    assert sorted(manifest.files) == [
        "config.json",
        "empty.txt",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "sub/deeper/tokenizer.json",
    ]
    for key, entry in manifest.files.items():
        data = (model_dir / key).read_bytes()
        pieces = tuple(hashlib.sha256(data[at:at + PIECE_BYTES]).hexdigest() for at in range(0, len(data), PIECE_BYTES))
        assert entry == FileEntry(sha256=hashlib.sha256(data).hexdigest(), size=len(data), pieces=pieces)
    assert manifest.version == 2 and manifest.piece_bytes == PIECE_BYTES
    assert not list(model_dir.glob(".*.tmp*"))


def test_rewriting_ignores_the_manifest_itself_and_is_stable(model_dir: Path) -> None:
    write_manifest(model_dir)
    first = (model_dir / MANIFEST_NAME).read_bytes()
    write_manifest(model_dir)
    assert (model_dir / MANIFEST_NAME).read_bytes() == first
    assert MANIFEST_NAME not in load_manifest(model_dir).files


def test_verify_accepts_listed_files(model_dir: Path) -> None:
    write_manifest(model_dir)
    manifest = load_manifest(model_dir)
    for key in manifest.files:
        assert manifest.verify_file(model_dir, key) == manifest.files[key]
    manifest.verify_file(model_dir, Path("sub") / "deeper" / "tokenizer.json")
    manifest.verify_all(model_dir)


def test_changed_byte_is_a_mismatch_naming_the_file(model_dir: Path) -> None:
    write_manifest(model_dir)
    shard = model_dir / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[2 * 1024 * 1024 + 5] ^= 0x01  # inside the third 1 MiB chunk; same size
    shard.write_bytes(bytes(data))
    with pytest.raises(ManifestMismatch) as info:
        load_manifest(model_dir).verify_file(model_dir, "model-00001-of-00002.safetensors")
    assert info.value.path == "model-00001-of-00002.safetensors"
    assert "sha256" in str(info.value) and "model-00001-of-00002.safetensors" in str(info.value)
    assert isinstance(info.value, ShardError)


def test_truncated_file_fails_on_size(model_dir: Path) -> None:
    write_manifest(model_dir)
    shard = model_dir / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(ManifestMismatch, match="size is 999 bytes, manifest says 1000"):
        load_manifest(model_dir).verify_file(model_dir, shard.name)


def test_missing_file_is_a_mismatch(model_dir: Path) -> None:
    write_manifest(model_dir)
    (model_dir / "config.json").unlink()
    manifest = load_manifest(model_dir)
    with pytest.raises(ManifestMismatch, match="config.json.*listed in the manifest but missing"):
        manifest.verify_file(model_dir, "config.json")
    with pytest.raises(ManifestMismatch, match="config.json"):
        manifest.verify_all(model_dir)


def test_unlisted_file_is_a_mismatch(model_dir: Path) -> None:
    write_manifest(model_dir)
    (model_dir / "extra.bin").write_bytes(b"surprise")
    manifest = load_manifest(model_dir)
    with pytest.raises(ManifestMismatch, match="extra.bin: file is not listed"):
        manifest.verify_file(model_dir, "extra.bin")
    with pytest.raises(ManifestMismatch, match="extra.bin: file is not listed"):
        manifest.verify_all(model_dir)


@pytest.mark.parametrize("relpath", ["../outside", "/etc/passwd", "", "sub/../../x"])
def test_paths_outside_the_directory_are_refused(model_dir: Path, relpath: str) -> None:
    write_manifest(model_dir)
    with pytest.raises(ManifestMismatch, match="relative and inside"):
        load_manifest(model_dir).verify_file(model_dir, relpath)


def test_no_manifest_loads_as_none(model_dir: Path) -> None:
    assert load_manifest(model_dir) is None


def with_files(files: dict) -> str:
    return json.dumps({"format": "hearth-manifest", "version": 1, "files": files})


SHA = "0" * 64
KIB64 = 64 * 1024


def v2(files: dict, piece_bytes: object = KIB64) -> str:
    return json.dumps({"format": "hearth-manifest", "version": 2, "piece_bytes": piece_bytes, "files": files})


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "is not a hearth-manifest object"),
        ('{"format": "other", "version": 1, "files": {}}', "is not a hearth-manifest object"),
        ('{"format": "hearth-manifest", "version": 99, "files": {}}', "version 99"),
        ('{"format": "hearth-manifest", "version": 1}', "no 'files' object"),
        (with_files({"a": 3}), "entry for 'a' is not an object"),
        (with_files({"a": {"sha256": "xyz", "size": 1}}), "bad sha256 'xyz'"),
        (with_files({"a": {"sha256": "0" * 64, "size": -1}}), "bad size -1"),
        (with_files({"a": {"sha256": "0" * 64, "size": True}}), "bad size True"),
        (with_files({"../a": {"sha256": "0" * 64, "size": 1}}), "bad path '../a'"),
        (with_files({"./a": {"sha256": "0" * 64, "size": 1}}), "non-canonical path './a'"),
        (with_files({"a": {"sha256": SHA, "size": 1, "pieces": [SHA]}}), "'pieces' in a version-1"),
        ('{"format": "hearth-manifest", "version": 1, "piece_bytes": 65536, "files": {}}', "version 1 but has"),
        ('{"format": "hearth-manifest", "version": true, "files": {}}', "version True"),
        ('{"format": "hearth-manifest", "version": 2, "files": {}}', "bad piece_bytes None"),
        (v2({}, 65535), "bad piece_bytes 65535"),
        (v2({}, 3 * KIB64), "bad piece_bytes 196608"),
        (v2({}, KIB64 // 2), "bad piece_bytes 32768"),
        (v2({}, 128 << 20), "bad piece_bytes 134217728"),
        (v2({}, "65536"), "bad piece_bytes '65536'"),
        (v2({}, True), "bad piece_bytes True"),
        (v2({"a": {"sha256": SHA, "size": 1}}), "entry for 'a' has no 'pieces' list"),
        (v2({"a": {"sha256": SHA, "size": 1, "pieces": SHA}}), "entry for 'a' has no 'pieces' list"),
        (v2({"a": {"sha256": SHA, "size": 1, "pieces": []}}), "lists 0 pieces; 1 bytes in pieces of 65536 make 1"),
        (v2({"a": {"sha256": SHA, "size": 0, "pieces": [SHA]}}), "lists 1 pieces; 0 bytes"),
        (v2({"a": {"sha256": SHA, "size": KIB64 + 1, "pieces": [SHA]}}), "lists 1 pieces; 65537 bytes .* make 2"),
        (v2({"a": {"sha256": SHA, "size": KIB64, "pieces": [SHA, SHA]}}), "lists 2 pieces; 65536 bytes .* make 1"),
        (v2({"a": {"sha256": SHA, "size": 1, "pieces": ["A" * 64]}}), "bad sha256 for piece 0: 'AAAA"),
        (v2({"a": {"sha256": SHA, "size": KIB64 + 1, "pieces": [SHA, 7]}}), "bad sha256 for piece 1: 7"),
        (v2({"a": {"sha256": SHA, "size": 1, "pieces": [SHA[:-1]]}}), "bad sha256 for piece 0"),
        (v2({"a": {"sha256": "x", "size": 1, "pieces": [SHA]}}), "entry for 'a' has a bad sha256 'x'"),
        (v2({"a": {"sha256": SHA, "size": 1 << 60, "pieces": []}}), "bad size 1152921504606846976"),
        (v2({"a": {"sha256": SHA, "size": 1.5, "pieces": [SHA]}}), "bad size 1.5"),
    ],
)
def test_corrupt_manifest_is_refused_naming_it(model_dir: Path, text: str, match: str) -> None:
    (model_dir / MANIFEST_NAME).write_text(text)
    with pytest.raises(CorruptManifest, match=match) as info:
        load_manifest(model_dir)
    assert info.value.path == str(model_dir / MANIFEST_NAME)
    assert isinstance(info.value, ManifestMismatch)


def test_digest_is_canonical_and_tracks_content(model_dir: Path) -> None:
    write_manifest(model_dir)
    manifest = load_manifest(model_dir)
    assert manifest.digest == hashlib.sha256(manifest.canonical_bytes()).hexdigest()
    # formatting of the file does not matter, only its content
    data = json.loads((model_dir / MANIFEST_NAME).read_text())
    (model_dir / MANIFEST_NAME).write_text(json.dumps(data, indent=7))
    assert load_manifest(model_dir).digest == manifest.digest
    reordered = dict(reversed(list(data["files"].items())))
    assert parse_manifest({**data, "files": reordered}).digest == manifest.digest
    (model_dir / "config.json").write_text('{"model_type": "mistral"}')
    write_manifest(model_dir)
    assert load_manifest(model_dir).digest != manifest.digest


def test_digest_does_not_depend_on_where_the_model_lives(model_dir: Path, tmp_path: Path) -> None:
    write_manifest(model_dir)
    copy = shutil.copytree(model_dir, tmp_path / "elsewhere" / "renamed")
    os.remove(copy / MANIFEST_NAME)
    write_manifest(copy)
    assert load_manifest(copy).digest == load_manifest(model_dir).digest


def test_hashing_reads_in_one_mib_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.bin"
    payload = random.Random(1).randbytes(5 * 1024 * 1024 + 3)
    path.write_bytes(payload)
    reads: list[int] = []
    real_open = open

    class CountingFile:
        def __init__(self, raw):
            self.raw = raw

        def readinto(self, buffer) -> int:
            reads.append(len(buffer))
            return self.raw.readinto(buffer)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.raw.close()

    counting_open = lambda *a, **k: CountingFile(real_open(*a, **k))  # noqa: E731
    monkeypatch.setattr(manifest_module, "open", counting_open, raising=False)
    assert hash_file(path) == hashlib.sha256(payload).hexdigest()
    assert set(reads) == {manifest_module.CHUNK_BYTES} and len(reads) == 7  # 6 reads of data, 1 at EOF


def test_symlinked_files_are_followed_and_hidden_dirs_skipped(model_dir: Path, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"weights")
    (model_dir / "linked.safetensors").symlink_to(blob)
    assert "linked.safetensors" in list_model_files(model_dir)
    assert not any(key.startswith(".git") for key in list_model_files(model_dir))
    write_manifest(model_dir)
    entry = load_manifest(model_dir).verify_file(model_dir, "linked.safetensors")
    assert entry.sha256 == hashlib.sha256(b"weights").hexdigest()


def test_writing_for_a_missing_directory_names_it(tmp_path: Path) -> None:
    with pytest.raises(ManifestMismatch, match="does not exist"):
        write_manifest(tmp_path / "absent")


# --- version 2: pieces ------------------------------------------------------------------------------


def slices(data: bytes, piece_bytes: int) -> tuple[str, ...]:
    return tuple(hashlib.sha256(data[at:at + piece_bytes]).hexdigest() for at in range(0, len(data), piece_bytes))


@pytest.mark.parametrize("piece_bytes", [KIB64, 256 * 1024, 1 << 20, 2 << 20, 4 << 20, 64 << 20])
@pytest.mark.parametrize("size", [0, 1, KIB64 - 1, KIB64, KIB64 + 1, (1 << 20) + 7, 5 * (1 << 20)])
def test_one_pass_hashing_equals_hashlib_over_the_slices(tmp_path: Path, piece_bytes: int, size: int) -> None:
    data = random.Random(size).randbytes(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    entry = hash_file_pieces(path, piece_bytes)
    assert entry == FileEntry(hashlib.sha256(data).hexdigest(), size, slices(data, piece_bytes))
    assert len(entry.pieces) == -(-size // piece_bytes)


def test_pieces_hash_in_one_pass_of_one_mib_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.bin"
    payload = random.Random(2).randbytes(5 * 1024 * 1024 + 3)
    path.write_bytes(payload)
    opened: list[int] = []
    reads: list[int] = []
    real_open = open

    class CountingFile:
        def __init__(self, raw):
            self.raw = raw

        def readinto(self, buffer) -> int:
            reads.append(len(buffer))
            return self.raw.readinto(buffer)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.raw.close()

    def counting_open(*a, **k):
        opened.append(1)
        return CountingFile(real_open(*a, **k))

    monkeypatch.setattr(manifest_module, "open", counting_open, raising=False)
    entry = hash_file_pieces(path, KIB64 * 4)
    assert len(opened) == 1 and set(reads) == {manifest_module.CHUNK_BYTES} and len(reads) == 7
    assert entry.pieces == slices(payload, KIB64 * 4) and entry.sha256 == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize("piece_bytes", [KIB64, 1 << 20, 4 << 20])
def test_pieces_round_trip_through_the_file(model_dir: Path, piece_bytes: int) -> None:
    write_manifest(model_dir, piece_bytes)
    text = json.loads((model_dir / MANIFEST_NAME).read_text())
    assert text["version"] == 2 and text["piece_bytes"] == piece_bytes
    manifest = load_manifest(model_dir)
    assert manifest == build_manifest(model_dir, piece_bytes) and manifest.digest == build_manifest(model_dir, piece_bytes).digest
    assert manifest.files["empty.txt"].pieces == () and manifest.piece_count("empty.txt") == 0
    big = "model-00001-of-00002.safetensors"
    data = (model_dir / big).read_bytes()
    assert manifest.files[big].pieces == slices(data, piece_bytes)
    assert manifest.piece_count(big) == -(-len(data) // piece_bytes)
    manifest.verify_all(model_dir)
    # the piece size is part of the identity
    other = KIB64 * 2 if piece_bytes == KIB64 else KIB64
    assert build_manifest(model_dir, other).digest != manifest.digest


def test_check_piece_accepts_the_right_bytes_and_refuses_others_naming_the_piece(model_dir: Path) -> None:
    write_manifest(model_dir, KIB64)
    manifest = load_manifest(model_dir)
    name = "model-00001-of-00002.safetensors"
    data = (model_dir / name).read_bytes()
    count = manifest.piece_count(name)
    assert count == 49  # 3 MiB + 17 bytes
    for index in range(count):
        offset, length = manifest.piece_span(name, index)
        assert offset == index * KIB64 and length == (17 if index == count - 1 else KIB64)
        manifest.check_piece(name, index, data[offset:offset + length])
    offset, length = manifest.piece_span(name, 3)
    flipped = bytearray(data[offset:offset + length])
    flipped[100] ^= 1
    with pytest.raises(ManifestMismatch, match="piece 3 has sha256") as info:
        manifest.check_piece(name, 3, bytes(flipped))
    assert info.value.path == name
    with pytest.raises(ManifestMismatch, match="piece 4 has sha256"):
        manifest.check_piece(name, 4, data[offset:offset + length])  # right length, another piece's bytes
    with pytest.raises(ManifestMismatch, match=f"{name}: piece 3 is 65535 bytes, manifest says 65536"):
        manifest.check_piece(name, 3, data[offset:offset + length - 1])
    with pytest.raises(ManifestMismatch, match="piece 48 is 18 bytes, manifest says 17"):
        manifest.check_piece(name, 48, data[-17:] + b"x")
    for bad in (-1, 49, True, "1"):
        with pytest.raises(ManifestMismatch, match=f"has no piece {bad!r}"):
            manifest.piece_span(name, bad)
    with pytest.raises(ManifestMismatch, match="has no piece 0"):
        manifest.check_piece("empty.txt", 0, b"")
    with pytest.raises(ManifestMismatch, match="absent.bin: file is not listed"):
        manifest.check_piece("absent.bin", 0, b"")


@pytest.mark.parametrize("piece_bytes", [0, KIB64 - 1, KIB64 // 2, 3 * KIB64, (64 << 20) * 2, -KIB64])
def test_invalid_piece_sizes_are_refused(model_dir: Path, piece_bytes: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        build_manifest(model_dir, piece_bytes)


def test_a_version_1_manifest_still_verifies_and_is_upgraded_for_the_digest(model_dir: Path, caplog) -> None:
    fresh = build_manifest(model_dir)
    v1 = Manifest({k: FileEntry(e.sha256, e.size) for k, e in fresh.files.items()}, version=1)
    (model_dir / MANIFEST_NAME).write_text(json.dumps(v1.to_json()))
    loaded = load_manifest(model_dir)
    assert loaded.version == 1 and all(entry.pieces == () for entry in loaded.files.values())
    loaded.verify_all(model_dir)
    with pytest.raises(ManifestMismatch, match="version-1 manifest lists no pieces"):
        loaded.piece_count("config.json")
    assert loaded.digest != fresh.digest  # the v1 JSON's own digest is not the identity
    with caplog.at_level("INFO", logger="shard.manifest"):
        assert identity_manifest(model_dir) == fresh
    assert "upgraded" in caplog.text
    assert load_manifest(model_dir) == fresh  # written back
    assert manifest_module.model_digest(model_dir) == fresh.digest
    assert not list(model_dir.glob(".*.tmp*"))


def test_a_version_1_manifest_in_a_read_only_directory_is_upgraded_in_memory(
        model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = build_manifest(model_dir)
    v1 = Manifest({k: FileEntry(e.sha256, e.size) for k, e in fresh.files.items()}, version=1)
    text = json.dumps(v1.to_json())
    (model_dir / MANIFEST_NAME).write_text(text)

    def read_only(path, manifest):
        raise PermissionError(13, "Read-only file system", str(path))

    monkeypatch.setattr(manifest_module, "save_manifest", read_only)  # root may write anywhere: say it cannot
    assert identity_manifest(model_dir) == fresh
    assert manifest_module.model_digest(model_dir) == fresh.digest
    assert (model_dir / MANIFEST_NAME).read_text() == text


def test_a_version_1_manifest_that_disagrees_with_the_files_is_not_upgraded(model_dir: Path) -> None:
    fresh = build_manifest(model_dir)
    v1 = Manifest({k: FileEntry(e.sha256, e.size) for k, e in fresh.files.items()}, version=1)
    text = json.dumps(v1.to_json())
    (model_dir / MANIFEST_NAME).write_text(text)
    (model_dir / "model-00002-of-00002.safetensors").write_bytes(b"tampered")
    with pytest.raises(ManifestMismatch, match="model-00002-of-00002.safetensors"):
        identity_manifest(model_dir)
    (model_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ManifestMismatch, match="model-00002-of-00002.safetensors: file is listed .* but missing"):
        identity_manifest(model_dir)
    assert (model_dir / MANIFEST_NAME).read_text() == text


def test_identity_is_the_same_with_a_v2_manifest_or_none(model_dir: Path) -> None:
    fresh = build_manifest(model_dir)
    assert manifest_module.model_digest(model_dir) == fresh.digest  # no manifest: hashed, nothing written
    assert not (model_dir / MANIFEST_NAME).exists()
    write_manifest(model_dir)
    assert identity_manifest(model_dir) == fresh and manifest_module.model_digest(model_dir) == fresh.digest
