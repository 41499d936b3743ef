"""Lazy reading of a Hugging Face safetensors checkpoint: one tensor at a time, only those asked for.

A checkpoint is `model.safetensors` or shards listed in `model.safetensors.index.json`. Files are
memory-mapped by safetensors and a tensor is copied out only when asked for, so a node serving a
quarter of the blocks reads (and holds) about a quarter of the weights. Each file is checked
against `hearth-manifest.json`, when there is one, before its first tensor is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from shard.errors import CorruptCheckpoint, MissingTensor
from shard.manifest import Manifest, load_manifest

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_READ = object()  # Checkpoint's default: read the directory's manifest itself


class Checkpoint:
    """Tensor names -> files of one model directory; `read(name)` loads one tensor."""

    def __init__(self, model_dir: str | Path, *, verify: bool = True, manifest: Manifest | None | object = _READ):
        """`manifest`: the directory's, when the caller has read it already (`shard.model_dir`)."""
        self.model_dir = Path(model_dir)
        if not verify:
            manifest = None
        elif manifest is _READ:
            manifest = load_manifest(self.model_dir)
        self.manifest: Manifest | None = manifest
        self.weight_map = _weight_map(self.model_dir)
        self._handles: dict[str, object] = {}
        self._checked: set[str] = set()  # files verified against the manifest and the index

    @property
    def names(self) -> list[str]:
        return sorted(self.weight_map)

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def files_for(self, names: list[str]) -> list[str]:
        return sorted({self.weight_map[n] for n in names if n in self.weight_map})

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `name`, converted to `dtype` when given."""
        filename = self.weight_map.get(name)
        if filename is None:
            raise MissingTensor(name, str(self.model_dir))
        handle = self._open(filename)
        try:
            tensor = handle.get_tensor(name)
        except Exception as err:  # safetensors raises its own error types for bad offsets
            raise CorruptCheckpoint(f"cannot read tensor {name!r} from {filename}: {err}") from err
        return tensor if dtype is None else tensor.to(dtype)

    def release(self) -> None:
        """Let go of the mapped files: once no tensor read from them is alive, their pages leave
        this process's resident memory (a loader quantizing block by block calls this after each
        block, so its peak holds one block of the checkpoint, not the span). Files are not
        verified again when read next."""
        self._handles.clear()

    def _open(self, filename: str):
        handle = self._handles.get(filename)
        if handle is not None:
            return handle
        path = self.model_dir / filename
        if self.manifest is not None and filename not in self._checked:
            self.manifest.verify_file(self.model_dir, filename)
        try:
            handle = safe_open(str(path), framework="pt")
        except FileNotFoundError as err:
            raise CorruptCheckpoint(f"checkpoint file {filename} is missing from {self.model_dir}") from err
        except Exception as err:
            raise CorruptCheckpoint(f"{filename} is not a valid safetensors file: {err}") from err
        names = set(handle.keys())
        listed = {n for n, f in self.weight_map.items() if f == filename}
        if not listed <= names:
            missing = sorted(listed - names)[0]
            raise CorruptCheckpoint(f"{filename} lacks tensor {missing!r} that the index places there")
        self._checked.add(filename)
        self._handles[filename] = handle
        return handle


def _weight_map(model_dir: Path) -> dict[str, str]:
    index = model_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise CorruptCheckpoint(f"{INDEX_FILE} in {model_dir} is unreadable: {err!r}") from err
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CorruptCheckpoint(f"{INDEX_FILE} in {model_dir} has a malformed weight_map")
        for filename in set(weight_map.values()):
            if Path(filename).name != filename:
                raise CorruptCheckpoint(f"{INDEX_FILE} names a file outside the model directory: {filename!r}")
        return dict(weight_map)
    single = model_dir / SINGLE_FILE
    if not single.exists():
        raise CorruptCheckpoint(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}")
    return {name: SINGLE_FILE for name in _header_names(single)}


MAX_HEADER_BYTES = 100 * 2**20  # a safetensors header larger than this is refused


def safetensors_header(path: Path) -> tuple[int, dict]:
    """(length of the JSON header, the header) of a safetensors file, read without mapping the tensors."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            file_size = path.stat().st_size
            if size <= 0 or size > min(file_size - 8, MAX_HEADER_BYTES):
                raise CorruptCheckpoint(f"{path.name} has a header length of {size} bytes in a {file_size}-byte file")
            header = json.loads(f.read(size))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptCheckpoint(f"{path.name} has an unreadable header: {err}") from err
    if not isinstance(header, dict):
        raise CorruptCheckpoint(f"{path.name} has a malformed header")
    return size, header


def _header_names(path: Path) -> list[str]:
    """Tensor names from a safetensors header, read without mapping the tensors."""
    return [name for name in safetensors_header(path)[1] if name != "__metadata__"]
