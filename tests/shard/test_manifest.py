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
    FileEntry,
    hash_file,
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
        assert entry == FileEntry(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
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
