"""GGUF files as models: each architecture and tensor type against a dequantizing reference, the
4-bit types taken as Hearth's int4 without requantizing, and bad files refused in one line."""

from __future__ import annotations

import dataclasses
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from gguf.constants import GGMLQuantizationType as Q

from shard.errors import ShardError
from shard.gguf_file import GGUFCheckpoint, GGUFModel
from shard.model_dir import ModelDir, open_model_dir
from shard.pipeline import LocalPipeline
from shard import quant
from shard.quant import Int4Linear, Int8Linear, int4_dequantize
from shard.span import load_span
from tools.gguf_write import BLOCK_TYPES, FLOAT_TYPES, GGUF_ARCH, dequantized_dir, write_gguf

# K-quants need rows of 256: every linear's input is a multiple of 256 here
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=64)
FAMILY_SHAPE = {"llama": {}, "llama3": {}, "mistral": {"sliding_window": None, "num_key_value_heads": 1},
                "qwen2": {}}
PROMPT = torch.tensor([[1, 17, 33, 200, 5, 77, 128]])
NATIVE = {Q.F32: "none", Q.F16: "none", Q.BF16: "none", Q.Q8_0: "int8", Q.Q4_0: "int4", Q.Q4_1: "int4",
          Q.Q4_K: "int4", Q.Q5_K: "int8", Q.Q6_K: "int8"}


@pytest.fixture(scope="module")
def gguf_model(checkpoint_factory, tmp_path_factory):
    """`make(family, qtype)`: (the GGUF file, its dequantized reference directory, the source directory)."""
    made = {}

    def make(family: str, qtype: Q):
        if (family, qtype) not in made:
            source = checkpoint_factory(family, **{**SHAPE, **FAMILY_SHAPE[family]})
            out = tmp_path_factory.mktemp(f"gguf-{family}-{qtype.name}")
            path = write_gguf(source, out / f"tiny-{family}.{qtype.name}.gguf", qtype, arch=GGUF_ARCH[family])
            made[family, qtype] = path, dequantized_dir(path, source, out / "reference"), source
        return made[family, qtype]

    return make


def last_logits(model, quant: str = "none") -> torch.Tensor:
    pipeline = LocalPipeline.load(model, parts=2, quant=quant)
    pipeline.start(1, 16)
    return pipeline.forward(PROMPT)


@pytest.mark.parametrize("family", ["llama", "llama3", "mistral", "qwen2"])
def test_each_architecture_equals_the_same_weights_as_a_directory(gguf_model, family):
    path, reference, source = gguf_model(family, Q.F32)
    model = open_model_dir(path)
    assert isinstance(model, GGUFModel)
    got, want = model.config, ModelDir(source).config
    assert got.rms_norm_eps == pytest.approx(want.rms_norm_eps)  # GGUF keeps it in float32
    # llama.cpp writes Mistral as "llama": the same blocks (a sliding window it does not keep)
    assert got.architecture == ("Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM")
    assert dataclasses.replace(got, architecture=want.architecture, rms_norm_eps=want.rms_norm_eps, rope=want.rope) == want
    assert got.rope.kind == ("factors" if family == "llama3" else want.rope.kind)
    torch.testing.assert_close(last_logits(model), last_logits(source), atol=1e-4, rtol=0)


@pytest.mark.parametrize("qtype", FLOAT_TYPES + BLOCK_TYPES, ids=lambda q: q.name)
def test_each_type_dequantizes_like_the_gguf_package(gguf_model, qtype):
    path, reference, _ = gguf_model("llama", qtype)
    torch.testing.assert_close(last_logits(path), last_logits(reference), atol=1e-4, rtol=0)


@pytest.mark.parametrize("qtype", FLOAT_TYPES + BLOCK_TYPES, ids=lambda q: q.name)
def test_auto_runs_each_type_as_its_native_quantization(gguf_model, qtype):
    path, reference, _ = gguf_model("qwen2", qtype)
    model = GGUFModel(path)
    assert model.native_quant == (NATIVE[qtype], 32)
    span = load_span(model, 0, 2, quant="auto")
    assert span.quant == NATIVE[qtype]
    expected = last_logits(reference, NATIVE[qtype] if NATIVE[qtype] == "int8" else "none")
    actual = last_logits(model, "auto")
    scale = expected.abs().max()
    # int4: scales rounded to bf16, and the kernel takes activations as int8 (per 32)
    tolerance = 1e-4 if NATIVE[qtype] != "int4" else 5e-2
    assert (actual - expected).abs().max() <= tolerance * scale


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K], ids=lambda q: q.name)
def test_four_bit_blocks_become_int4_groups_without_requantizing(gguf_model, qtype, monkeypatch):
    path, reference, _ = gguf_model("llama", qtype)

    def refuse(*args):  # min/max requantizing of a 16-level grid can give back the same values
        raise AssertionError("a 4-bit block was dequantized and quantized again")

    monkeypatch.setattr(quant, "quantize_int4", refuse)
    span = load_span(path, 0, 1, quant="auto")
    monkeypatch.undo()
    expected = load_span(reference, 0, 1)
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        layer = span.blocks[0].get_submodule(name)
        assert isinstance(layer, Int4Linear) and layer.group_size == 32
        weight = int4_dequantize(*layer.portable(), 32)
        want = expected.blocks[0].get_submodule(name).weight
        # the file's codes, with scale and zero rounded to bf16 (relative 2^-9 each)
        assert (weight - want).abs().max() <= 2**-8 * 9 * want.abs().max()


def test_int8_of_a_four_bit_file_requantizes_the_dequantized_weights(gguf_model):
    path, reference, _ = gguf_model("llama", Q.Q4_K)
    span = load_span(path, 0, 1, quant="int8")
    assert isinstance(span.blocks[0].self_attn.qkv_proj, Int8Linear)
    torch.testing.assert_close(last_logits(path, "int8"), last_logits(reference, "int8"), atol=1e-4, rtol=0)


def test_identity_is_the_files_content_not_its_name(gguf_model, tmp_path):
    path, reference, source = gguf_model("llama", Q.Q8_0)
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(path.read_bytes())
    assert GGUFModel(copy).digest == GGUFModel(path).digest
    assert GGUFModel(copy).name == "renamed"
    assert GGUFModel(path).digest not in (ModelDir(reference).digest, ModelDir(source).digest)
    other, _, _ = gguf_model("llama", Q.Q4_0)
    assert GGUFModel(other).digest != GGUFModel(path).digest


# --- bad files: one line naming what is wrong, exit status 2, nothing allocated from a lie ---------


def _key(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def _header(n_tensors: int, n_values: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_values)


def bad_files(good: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what its error must say)."""
    data = good.read_bytes()
    made = {
        "truncated": (data[: len(data) * 2 // 3], "truncated"),
        "wrong magic": (b"GGML" + data[4:], "not a GGUF file"),
        "empty": (b"", "not a GGUF file"),
        "version": (b"GGUF" + struct.pack("<I", 7) + data[8:], "version 7"),
        "lying array count": (_header(0, 1) + _key("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 1 << 40),
                              "does not fit"),
        "lying string length": (_header(0, 1) + _key("general.name") + struct.pack("<IQ", 8, 1 << 50), "needs"),
        "lying tensor count": (_header(1 << 50, 0), "tensor count"),
        "huge tensor": (_header(1, 0) + _key("w") + struct.pack("<IQQIQ", 2, 1 << 20, 1 << 20, 0, 0) + bytes(64),
                        "beyond the end of the file"),
        "partial block": (_header(1, 0) + _key("w") + struct.pack("<IQQIQ", 2, 33, 1, 8, 0) + bytes(64),
                          "not whole blocks"),
    }
    paths = {}
    for name, (content, says) in made.items():
        path = tmp_path / (name.replace(" ", "-") + ".gguf")
        path.write_bytes(content)
        paths[name] = path, says
    return paths


def test_each_bad_file_is_one_error_naming_the_problem(gguf_model, tmp_path):
    path, _, _ = gguf_model("llama", Q.Q8_0)
    for name, (bad, says) in bad_files(path, tmp_path).items():
        tracemalloc.start()
        with pytest.raises(ShardError) as caught:
            GGUFModel(bad)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert says in str(caught.value), name
        assert "\n" not in str(caught.value) and str(bad) in str(caught.value)
        assert peak < 1 << 20, f"{name}: {peak} bytes allocated"


def test_metadata_that_disagrees_with_the_tensors_is_refused(checkpoint_factory, tmp_path):
    source = checkpoint_factory("llama", **SHAPE)
    cases = {"block_count": ("llama.block_count", 3, "blk.2.attn_norm.weight"),
             "hidden": ("llama.embedding_length", 4096, "the metadata says"),
             "absurd": ("llama.embedding_length", 1 << 40, "beyond the 65536"),  # refused before any tensor is read
             "heads": ("llama.attention.head_count", 3, "not a multiple")}
    for name, (key, value, says) in cases.items():
        path = write_gguf(source, tmp_path / f"{name}.gguf", Q.F16, metadata={key: value})
        with pytest.raises(ShardError, match=says):
            GGUFModel(path)


def test_unsupported_architecture_and_type_are_named(checkpoint_factory, tmp_path):
    source = checkpoint_factory("llama", **SHAPE)
    with pytest.raises(ShardError, match="phi3"):
        GGUFModel(write_gguf(source, tmp_path / "phi.gguf", Q.F16, arch="phi3"))
    with pytest.raises(ShardError, match="Q5_0.*supported: F32"):
        GGUFModel(write_gguf(source, tmp_path / "q5.gguf", Q.Q5_0))


def test_the_cli_says_one_line_and_exits_2(gguf_model, tmp_path, capsys):
    from node.cli import main

    path, _, _ = gguf_model("llama", Q.Q8_0)
    for name, (bad, says) in bad_files(path, tmp_path).items():
        assert main(["run", "--model", str(bad), "--prompt-ids", "1,2", "--max-new-tokens", "1"]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err and "Traceback" not in err, err


def test_hearth_manifest_tells_a_gguf_file_it_needs_none(gguf_model, capsys):
    from node.cli import main

    path, _, _ = gguf_model("llama", Q.Q8_0)
    assert main(["manifest", str(path)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == GGUFModel(path).digest
    assert not (path.parent / "hearth-manifest.json").exists()


def test_identity_is_a_version_2_manifest_of_the_file_and_its_pieces(gguf_model):
    import hashlib

    from shard.manifest import PIECE_BYTES, FileEntry, Manifest

    path, _, _ = gguf_model("llama", Q.Q8_0)
    data = path.read_bytes()
    pieces = tuple(hashlib.sha256(data[at:at + PIECE_BYTES]).hexdigest() for at in range(0, len(data), PIECE_BYTES))
    expected = Manifest({"model.gguf": FileEntry(hashlib.sha256(data).hexdigest(), len(data), pieces)})
    model = GGUFModel(path)
    assert model.manifest == expected and model.manifest.version == 2 and model.manifest.piece_bytes == PIECE_BYTES
    assert model.digest == hashlib.sha256(expected.canonical_bytes()).hexdigest()
    offset, length = model.manifest.piece_span("model.gguf", 0)
    model.manifest.check_piece("model.gguf", 0, data[offset:offset + length])


def test_a_gguf_file_without_the_suffix_is_known_by_its_magic(gguf_model, tmp_path):
    path, _, _ = gguf_model("llama", Q.Q4_0)
    blob = tmp_path / "sha256-0123abcd"  # how Ollama names its blobs
    blob.write_bytes(path.read_bytes())
    model = open_model_dir(blob)
    assert isinstance(model, GGUFModel) and model.digest == GGUFModel(path).digest
    with pytest.raises(ShardError, match="config.json"):
        open_model_dir(tmp_path / "missing")


def test_a_span_reads_only_its_own_blocks_tensors(gguf_model, monkeypatch):
    path, reference, _ = gguf_model("llama", Q.Q4_K)
    read = []
    original = GGUFCheckpoint._info
    monkeypatch.setattr(GGUFCheckpoint, "_info", lambda self, name: read.append(name) or original(self, name))
    span = load_span(path, 1, 2, quant="auto")
    assert read and all(name.startswith("model.layers.1.") for name in read)
    torch.testing.assert_close(span(torch.ones(1, 3, 256), span.new_cache(1, 8)),
                               load_span(reference, 1, 2)(torch.ones(1, 3, 256), span.new_cache(1, 8)),
                               atol=0, rtol=1e-2)
