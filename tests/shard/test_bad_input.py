"""Every kind of bad checkpoint or request raises a typed error that names what is wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from shard.checkpoint import Checkpoint
from shard.config import SUPPORTED_ARCHITECTURES, load_config
from shard.errors import (
    ConfigError, CorruptCheckpoint, InvalidInput, MissingTensor, PromptTooLong, ShardError,
    SpanOutOfRange, UnsupportedArchitecture,
)
from shard.head import load_head
from shard.pipeline import LocalPipeline
from shard.span import load_span


@pytest.fixture
def model_dir(checkpoint_factory, tmp_path):
    """A private copy of a tiny checkpoint that a test may damage."""
    copy = tmp_path / "model"
    shutil.copytree(checkpoint_factory("llama"), copy)
    return copy


def _edit_config(model_dir, **changes):
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


def test_unsupported_architecture_is_named_with_the_supported_list(model_dir):
    _edit_config(model_dir, architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedArchitecture) as err:
        load_config(model_dir)
    assert "GPT2LMHeadModel" in str(err.value)
    assert all(name in str(err.value) for name in SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("field, value", [("hidden_size", -1), ("num_hidden_layers", "8"),
                                          ("num_key_value_heads", 3), ("hidden_act", "gelu")])
def test_invalid_config_field_is_named(model_dir, field, value):
    _edit_config(model_dir, **{field: value})
    with pytest.raises(ConfigError, match=field.split("_")[0]):
        load_config(model_dir)


def test_unsupported_rope_type_is_named(model_dir):
    _edit_config(model_dir, rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ConfigError, match="yarn"):
        load_config(model_dir)


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        load_config(tmp_path)


@pytest.mark.parametrize("start, end", [(0, 7), (-1, 2), (3, 3), (5, 2)])
def test_span_outside_the_model(model_dir, start, end):
    with pytest.raises(SpanOutOfRange, match=f"\\[{start}, {end}\\)"):
        load_span(model_dir, start, end, verify=False)


def test_missing_tensor_is_named(model_dir):
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    load_span(model_dir, 0, 2, verify=False)  # blocks before the hole still load
    with pytest.raises(MissingTensor, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        load_span(model_dir, 2, 4, verify=False)


def test_truncated_safetensors_is_refused(model_dir):
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpoint, match="model.safetensors"):
        load_span(model_dir, 0, 6, verify=False)


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 4, b"\xff" * 64, (20).to_bytes(8, "little") + b"{not json}" * 3])
def test_garbage_safetensors_is_refused(model_dir, garbage):
    (model_dir / "model.safetensors").write_bytes(garbage)
    with pytest.raises(CorruptCheckpoint):
        Checkpoint(model_dir, verify=False).read("model.norm.weight")


def test_wrong_tensor_shape_is_named(model_dir):
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpoint, match=r"q_proj\.weight.*\[3, 3\]"):
        load_span(model_dir, 0, 1, verify=False)


def test_index_naming_a_missing_shard(checkpoint_factory, tmp_path):
    copy = tmp_path / "sharded"
    shutil.copytree(checkpoint_factory("llama", shard_size="100KB"), copy)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    victim = copy / index["weight_map"]["model.layers.4.mlp.down_proj.weight"]
    victim.unlink()
    with pytest.raises(CorruptCheckpoint, match=victim.name):
        load_span(copy, 0, 6, verify=False)


def test_prompt_longer_than_the_context(model_dir):
    pipeline = LocalPipeline.load(model_dir)
    with pytest.raises(PromptTooLong, match="128"):
        pipeline.start(batch=1, max_length=129)
    pipeline.start(batch=1, max_length=8)
    with pytest.raises(PromptTooLong):
        pipeline.forward(torch.ones(1, 9, dtype=torch.long))


def test_out_of_vocabulary_token_is_named(model_dir):
    head = load_head(model_dir)
    with pytest.raises(InvalidInput, match="256"):
        head.embed(torch.tensor([[5, 256]]))


def test_hidden_states_of_the_wrong_shape(model_dir):
    span = load_span(model_dir, 0, 2)
    cache = span.new_cache(batch=1, max_length=8)
    with pytest.raises(InvalidInput, match="63"):
        span(torch.zeros(1, 2, 63), cache)
    with pytest.raises(InvalidInput, match="batch"):
        span(torch.zeros(2, 2, 64), cache)
    assert cache.length == 0  # a refused step leaves the session usable
    span(torch.zeros(1, 2, 64), cache)
    assert cache.length == 2


def test_errors_share_one_base():
    for cls in (ConfigError, CorruptCheckpoint, InvalidInput, MissingTensor, PromptTooLong, SpanOutOfRange,
                UnsupportedArchitecture):
        assert issubclass(cls, ShardError)


def test_manifest_mismatch_refuses_to_load_and_names_the_file(model_dir):
    from shard.errors import ManifestMismatch
    from shard.manifest import write_manifest

    write_manifest(model_dir)
    load_span(model_dir, 0, 2)  # verified and accepted
    path = model_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestMismatch, match="model.safetensors"):
        load_span(model_dir, 0, 2)
    with pytest.raises(ManifestMismatch, match="model.safetensors"):
        load_head(model_dir)
