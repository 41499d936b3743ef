"""`shard.model_ranges`: a sparse copy of a model (each file its own size, zeros but for the needed
ranges) loads the same span and head as the original, for directories (one file, sharded, tied
embeddings) and GGUF files; and the ranges of a span leave out every other block's tensors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from gguf.constants import GGMLQuantizationType as Q

from shard.errors import ShardError
from shard.gguf_file import IDENTITY_NAME, GGUFModel
from shard.head import head_tensor_names, load_head
from shard.manifest import list_model_files
from shard.model_dir import ModelDir, open_model_dir
from shard.model_ranges import merge_ranges, needed_ranges, safetensors_layout, total_bytes
from shard.span import block_prefix, block_tensor_names, load_span
from tools.gguf_write import GGUF_ARCH, write_gguf

SPANS = [(0, 2), (2, 4), (1, 6), (5, 6)]  # the tiny checkpoints have 6 blocks


def sparse_copy(model: Path, ranges: dict[str, list[tuple[int, int]]], dest: Path) -> Path:
    """`model` (a directory or a .gguf file) at `dest`: every file of the same size, zeros except
    `ranges`, copied from the original."""
    if model.is_file():
        files = {IDENTITY_NAME: (model, dest / model.name)}
    else:
        files = {key: (model / key, dest / key) for key in list_model_files(model)}
    for key, (source, target) in files.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        with source.open("rb") as src, target.open("wb") as dst:
            dst.truncate(source.stat().st_size)
            for offset, length in ranges.get(key, []):
                src.seek(offset)
                dst.seek(offset)
                dst.write(src.read(length))
    return dest / model.name if model.is_file() else dest


def span_output(model, start: int, end: int, quant: str = "none") -> torch.Tensor:
    span = load_span(model, start, end, quant=quant, verify=False)
    hidden = torch.randn(1, 5, span.config.hidden_size, generator=torch.Generator().manual_seed(start * 7 + end))
    return span(hidden, span.new_cache(1, 8))


def head_outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    head = load_head(model, verify=False)
    hidden = torch.randn(2, 3, head.config.hidden_size, generator=torch.Generator().manual_seed(1))
    return head.embed(torch.tensor([[1, 17, 200], [3, 4, 255]])), head.logits(hidden)


def check_sparse_copies(model: Path, tmp_path: Path, quant: str = "none") -> None:
    opened = open_model_dir(model, verify=False)
    for start, end in SPANS:
        copy = sparse_copy(model, needed_ranges(opened, start, end), tmp_path / f"span-{start}-{end}")
        torch.testing.assert_close(span_output(copy, start, end, quant), span_output(model, start, end, quant),
                                   rtol=0, atol=0)
    copy = sparse_copy(model, needed_ranges(opened, 5, 6, head=True), tmp_path / "head")
    for got, want in zip(head_outputs(copy), head_outputs(model)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the copy of [0, 2) lacks blocks 2 and 3: zeros there (a different output), or shards
    # whose headers are zeros too (refused)
    copy = sparse_copy(model, needed_ranges(opened, 0, 2), tmp_path / "wrong")
    try:
        wrong = span_output(copy, 2, 4, quant)
    except ShardError:
        return
    assert not torch.allclose(wrong, span_output(model, 2, 4, quant))


@pytest.mark.parametrize("family, shard_size", [("llama", None), ("llama", "100KB"), ("qwen2", None)],
                         ids=["llama", "llama-sharded", "qwen2-tied"])
def test_a_sparse_copy_of_a_directory_loads_the_same_span_and_head(checkpoint_factory, tmp_path, family, shard_size):
    model = checkpoint_factory(family, shard_size=shard_size)
    if shard_size:
        assert len(ModelDir(model).checkpoint().files_for(ModelDir(model).checkpoint().names)) > 2
    if family == "qwen2":
        assert not ModelDir(model).checkpoint().has("lm_head.weight")  # tied: saved once
    check_sparse_copies(model, tmp_path)


@pytest.mark.parametrize("family, qtype", [("llama3", Q.Q4_0), ("qwen2", Q.Q8_0)], ids=["llama3-Q4_0", "qwen2-Q8_0"])
def test_a_sparse_copy_of_a_gguf_file_loads_the_same_span_and_head(checkpoint_factory, tmp_path, family, qtype):
    source = checkpoint_factory(family)
    model = write_gguf(source, tmp_path / f"tiny-{family}.gguf", qtype, arch=GGUF_ARCH[family])
    ranges = needed_ranges(GGUFModel(model), 2, 4)
    assert list(ranges) == [IDENTITY_NAME]
    assert total_bytes(ranges) < 0.5 * model.stat().st_size
    check_sparse_copies(model, tmp_path / "copies", quant="auto")  # Q4_0: int4 codes taken as they are


@pytest.mark.parametrize("shard_size", [None, "100KB"])
def test_a_middle_span_reads_its_own_blocks_and_headers_only(checkpoint_factory, shard_size):
    model = checkpoint_factory("llama", shard_size=shard_size)
    opened = ModelDir(model, verify=False)
    ranges = needed_ranges(opened, 2, 4)
    files = {key: (model / key).stat().st_size for key in list_model_files(model)}
    assert total_bytes(ranges) < 0.4 * sum(files.values())
    assert "config.json" in ranges and "tokenizer.json" not in ranges
    assert ranges["config.json"] == [(0, files["config.json"])]
    for key, found in ranges.items():
        assert found == merge_ranges(found) and all(o + n <= files[key] for o, n in found)
        if not key.endswith(".safetensors"):
            continue
        header_end, tensors = safetensors_layout(model / key)
        assert found[0][0] == 0 and found[0][1] >= header_end  # every read file's header
        for name, (begin, stop) in tensors.items():
            inside = any(o <= begin and stop <= o + n for o, n in found)
            mine = name.startswith((block_prefix(2), block_prefix(3)))
            overlaps = any(begin < o + n and o < stop for o, n in found)
            assert inside if mine else not overlaps, name
    weight_files = set(opened.checkpoint().files_for(opened.checkpoint().names))
    wanted = {opened.checkpoint().weight_map[n] for n in opened.checkpoint().names
              if n.startswith((block_prefix(2), block_prefix(3)))}
    assert {key for key in ranges if key in weight_files} == wanted  # no other shard's header either


def test_tokenizer_files_go_whole_with_the_head(checkpoint_factory, tmp_path):
    model = tmp_path / "with-tokenizer"
    shutil.copytree(checkpoint_factory("llama"), model)
    (model / "tokenizer.json").write_text('{"version": "1.0"}')
    (model / "tokenizer_config.json").write_text("{}")
    opened = ModelDir(model, verify=False)
    head = needed_ranges(opened, 0, 1, head=True)
    assert head["tokenizer.json"] == [(0, (model / "tokenizer.json").stat().st_size)]
    assert head["tokenizer_config.json"] == [(0, 2)]
    assert "tokenizer.json" not in needed_ranges(opened, 0, 1)
    assert "tokenizer.json" in needed_ranges(opened, 0, 1, tokenizer=True)


def test_merge_ranges_joins_what_touches_or_overlaps():
    assert merge_ranges([(10, 5), (0, 4), (4, 2), (12, 10), (30, 0), (40, 1)]) == [(0, 6), (10, 12), (40, 1)]


def test_the_names_are_what_the_loaders_read(checkpoint_factory, monkeypatch):
    model = ModelDir(checkpoint_factory("llama"), verify=False)
    checkpoint, read = model.checkpoint(), []
    original = checkpoint.read
    monkeypatch.setattr(checkpoint, "read", lambda name, dtype=None: read.append(name) or original(name, dtype))
    load_span(model, 2, 4)
    assert sorted(read) == sorted(block_tensor_names(model.config, 2) + block_tensor_names(model.config, 3))
    read.clear()
    load_head(model)
    assert sorted(read) == sorted(head_tensor_names(model.config, checkpoint))
