"""Which bytes of a model's files a node (blocks [start, end)) or a client (the head) reads.

Owns mapping a span, and the client's head, to byte ranges of the model's files, worked out from
the files' headers alone (safetensors' JSON headers, the sharded checkpoint's index, GGUF's tensor
index), never their tensor data: what a node must fetch from peers before `shard.span.load_span`
or `shard.head.load_head` can run on a partial copy (the rest of each file may be anything).
Tensor names come from the loaders themselves (`shard.span.block_tensor_names`,
`shard.head.head_tensor_names`), so the ranges follow what is read.

Keys are the manifest's: relative POSIX paths in a directory; `shard.gguf_file.IDENTITY_NAME`
for a GGUF file. Ranges are (offset, length), sorted, merged where they touch or overlap.
Besides the tensors, what opening reads is counted: config.json, the sharded index, the header
(8-byte length + JSON) of each safetensors file that holds a needed tensor, GGUF's header,
metadata and tensor index (every byte before the first tensor's) and the one tensor opening a GGUF
file reads (Llama 3.1+'s `rope_freqs.weight`). Tokenizer files go whole with the head by default:
the client encodes and decodes, a node never opens them. The manifest itself is not listed: it is
what the ranges are checked against.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from shard.checkpoint import INDEX_FILE, safetensors_header
from shard.errors import CorruptCheckpoint, MissingTensor
from shard.gguf_file import IDENTITY_NAME, GGUFModel, gguf_name
from shard.gguf_format import TensorInfo
from shard.head import head_tensor_names
from shard.model_dir import ModelDir, OpenModel
from shard.span import block_tensor_names, check_span
from shard.tokenizer import TOKENIZER_FILE, tokenizer_files

Range = tuple[int, int]  # (offset, length) in bytes
CONFIG_FILE = "config.json"
_GGUF_OPENING_TENSORS = ("rope_freqs.weight",)  # shard.gguf_file.gguf_config dequantizes it when present


def needed_ranges(model: OpenModel, start: int, end: int, *, head: bool = False,
                  tokenizer: bool | None = None) -> dict[str, list[Range]]:
    """Per file of `model`, the merged byte ranges that opening it and loading blocks [start, end)
    (none for (0, 0)) read, and with `head` the client's head too (embeddings, final norm, LM head unless tied).
    `tokenizer` (default: `head`) adds the tokenizer's files whole."""
    if (start, end) != (0, 0):  # (0, 0): no blocks, the head alone (a client that runs none itself)
        check_span(model.config, start, end)
    names = [name for layer in range(start, end) for name in block_tensor_names(model.config, layer)]
    if head:
        names += head_tensor_names(model.config, model.checkpoint())
    ranges = tensor_ranges(model, names)
    if isinstance(model, ModelDir):
        extra = [CONFIG_FILE, INDEX_FILE]
        if (head if tokenizer is None else tokenizer) and (model.path / TOKENIZER_FILE).is_file():
            extra += [path.relative_to(model.path).as_posix() for path in tokenizer_files(model.path)]
        for key in extra:
            path = model.path / key
            if path.is_file():
                ranges.setdefault(key, []).append((0, path.stat().st_size))
    return {key: merge_ranges(found) for key, found in sorted(ranges.items())}


def tensor_ranges(model: OpenModel, names: Iterable[str]) -> dict[str, list[Range]]:
    """Per file, the ranges reading the tensors `names` (Hugging Face names) takes, headers
    included (unmerged). `MissingTensor` for a name the model lacks, as the loaders would say."""
    if isinstance(model, GGUFModel):
        return {IDENTITY_NAME: _gguf_ranges(model, names)}
    weight_map = model.checkpoint().weight_map
    by_file: dict[str, list[str]] = {}
    for name in names:
        filename = weight_map.get(name)
        if filename is None:
            raise MissingTensor(name, str(model.path))
        by_file.setdefault(filename, []).append(name)
    return {filename: ranges_of_file(model.path / filename, wanted) for filename, wanted in by_file.items()}


def ranges_of_file(path: str | Path, names: Iterable[str]) -> list[Range]:
    """The ranges of one safetensors file that reading `names` from it takes: its header and
    each tensor's bytes (unmerged)."""
    header_end, offsets = safetensors_layout(path)
    ranges = [(0, header_end)]
    for name in names:
        if name not in offsets:
            raise CorruptCheckpoint(f"{Path(path).name} lacks tensor {name!r} that the index places there")
        begin, stop = offsets[name]
        ranges.append((begin, stop - begin))
    return ranges


def safetensors_layout(path: str | Path) -> tuple[int, dict[str, Range]]:
    """(bytes of the header: 8-byte length + JSON, {tensor name: (begin, end) in the file}), read
    from the header alone."""
    path = Path(path)
    size, header = safetensors_header(path)
    file_size = path.stat().st_size
    data_start = 8 + size
    offsets = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        span = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(span, list) and len(span) == 2 and all(type(v) is int for v in span)
                and 0 <= span[0] <= span[1] <= file_size - data_start):
            raise CorruptCheckpoint(f"{path.name}: tensor {name!r} has bad data_offsets {span!r}")
        offsets[name] = (data_start + span[0], data_start + span[1])
    return data_start, offsets


def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    """`ranges` sorted, empty ones dropped, those that overlap or touch joined."""
    merged: list[list[int]] = []
    for offset, length in sorted(r for r in ranges if r[1] > 0):
        if merged and offset <= merged[-1][0] + merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], offset + length - merged[-1][0])
        else:
            merged.append([offset, length])
    return [(offset, length) for offset, length in merged]


def total_bytes(ranges: dict[str, list[Range]]) -> int:
    """Bytes the (merged) ranges of every file cover."""
    return sum(length for found in ranges.values() for _, length in found)


def _gguf_ranges(model: GGUFModel, names: Iterable[str]) -> list[Range]:
    tensors = model.file.tensors
    offsets = {name: gguf_offset(info) for name, info in tensors.items()}
    ranges = [(0, min(offsets.values()))]  # header, metadata, tensor index, padding to the data
    wanted = [name for name in _GGUF_OPENING_TENSORS if name in tensors]
    for name in names:
        if gguf_name(name) not in tensors:
            raise MissingTensor(name, f"{model.path} (as {gguf_name(name)!r})")
        wanted.append(gguf_name(name))
    return ranges + [(offsets[name], tensors[name].data.nbytes) for name in wanted]


def gguf_offset(info: TensorInfo) -> int:
    """Where `info`'s bytes start in its file: its data is a view of the file's one memory map
    (`shard.gguf_format.read_gguf`), so its address less the map's."""
    root = info.data
    while isinstance(root, np.ndarray):
        root = root.base
    base = np.frombuffer(root, dtype=np.uint8, count=1).__array_interface__["data"][0]
    return info.data.__array_interface__["data"][0] - base
