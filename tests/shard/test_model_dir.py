"""ModelDir: a model directory is read and checked once, however many loaders use it."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from shard import manifest as manifest_module
from shard.errors import ManifestMismatch
from shard.head import load_head
from shard.manifest import (MANIFEST_NAME, FileEntry, Manifest, build_manifest, list_model_files, load_manifest,
                            model_digest, write_manifest)
from shard.model_dir import ModelDir, open_model_dir
from shard.pipeline import LocalPipeline
from shard.span import load_span


@pytest.fixture
def model_dir(checkpoint_factory, tmp_path):
    copy = tmp_path / "tiny-llama"
    shutil.copytree(checkpoint_factory("llama", shard_size="200KB"), copy)
    write_manifest(copy)
    return copy


@pytest.fixture
def hashed(monkeypatch) -> Counter:
    """Files hashed (by name), counted."""
    counts: Counter = Counter()
    real, real_pieces = manifest_module.hash_file, manifest_module.hash_file_pieces

    def counting(path):
        counts[path.name] += 1
        return real(path)

    def counting_pieces(path, *args):
        counts[path.name] += 1
        return real_pieces(path, *args)

    monkeypatch.setattr(manifest_module, "hash_file", counting)
    monkeypatch.setattr(manifest_module, "hash_file_pieces", counting_pieces)
    return counts


def test_every_loader_on_one_model_dir_hashes_each_file_once(model_dir, hashed):
    opened = ModelDir(model_dir)
    head = load_head(opened)
    spans = [load_span(opened, 0, 1, quant="int8"), load_span(opened, 1, opened.config.num_layers)]
    LocalPipeline.load(opened, parts=2)
    digest, loads = opened.digest, Counter(hashed)
    weights = [name for name in list_model_files(model_dir) if name.endswith(".safetensors")]
    assert len(weights) > 2 and set(loads) == {"config.json", *weights}  # every shard was read, and checked
    assert max(loads.values()) == 1, loads
    assert digest == build_manifest(model_dir).digest and opened.name == "tiny-llama"
    assert head.config == spans[0].config == opened.config


def test_paths_still_work_and_open_their_own(model_dir, hashed):
    load_span(model_dir, 0, 1)
    load_span(model_dir, 0, 1)
    assert hashed["config.json"] == 2  # each load opened the directory itself
    assert open_model_dir(model_dir).path == model_dir
    opened = ModelDir(model_dir)
    assert open_model_dir(opened) is opened


def test_a_changed_weight_file_is_caught_on_first_read(model_dir):
    opened = ModelDir(model_dir)
    shard_file = sorted(model_dir.glob("*.safetensors"))[-1]
    data = bytearray(shard_file.read_bytes())
    data[-1] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    with pytest.raises(ManifestMismatch, match=shard_file.name):
        LocalPipeline.load(opened)


def test_a_changed_config_is_caught_on_open(model_dir):
    config = model_dir / "config.json"
    config.write_text(config.read_text().replace('"hidden_size"', '"hidden_size" ', 1))
    with pytest.raises(ManifestMismatch, match="config.json"):
        ModelDir(model_dir)
    assert ModelDir(model_dir, verify=False).config.hidden_size > 0  # trusted as it is when asked


def test_without_a_manifest_the_digest_hashes_the_files(model_dir):
    (model_dir / MANIFEST_NAME).unlink()
    opened = ModelDir(model_dir)
    assert opened.manifest is None and opened.digest == build_manifest(model_dir).digest


def test_a_version_1_manifest_is_upgraded_and_every_way_to_the_digest_agrees(model_dir, caplog):
    fresh = build_manifest(model_dir)
    v1 = Manifest({k: FileEntry(e.sha256, e.size) for k, e in fresh.files.items()}, version=1)
    (model_dir / MANIFEST_NAME).write_text(json.dumps(v1.to_json()))
    opened = ModelDir(model_dir)
    assert opened.manifest.version == 1  # still checks config.json (its sha256s are valid)
    with caplog.at_level("INFO", logger="shard.manifest"):
        assert opened.digest == fresh.digest
    assert "upgraded" in caplog.text and load_manifest(model_dir) == fresh
    assert opened.manifest == fresh  # later users see the pieces too
    LocalPipeline.load(opened)  # every weight file verified against the upgraded manifest
    assert ModelDir(model_dir).digest == model_digest(model_dir) == fresh.digest
