"""One model, opened once: its manifest, config, identity on the wire, checkpoint and tokenizer.

Every loader (`load_span`, `load_head`, `LocalPipeline.load`, the client, the node, the
simulator) takes an open model or a path (`open_model_dir` opens it: a Hugging Face directory as a
`ModelDir`, a `.gguf` file as a `shard.gguf_file.GGUFModel`, both with the same face), so a
process that opens the directory once reads the manifest once, checks config.json against it once,
and hashes each weight file at most once: the first time a tensor is read from it.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from shard.checkpoint import Checkpoint
from shard.config import ModelConfig, load_config
from shard.gguf_file import GGUFModel, is_gguf
from shard.manifest import Manifest, identity_manifest, load_manifest
from shard.quant import QUANT_MODES
from shard.tokenizer import TOKENIZER_FILE, Tokenizer, tokenizer_files

AUTO_QUANT = "auto"  # what the model's own weights are: a GGUF file's block types, a directory's floats
QUANT_CHOICES = (AUTO_QUANT, *QUANT_MODES)


class ModelDir:
    """A checkpoint directory, with what every user of it needs, each read (and checked) once.

    `verify=True` checks config.json and each weight file against `hearth-manifest.json` (when
    the directory has one) before using it; `verify=False` trusts the files as they are.
    """

    def __init__(self, path: str | Path, *, verify: bool = True):
        self.path = Path(path)
        self.verify = verify
        if verify:
            self.__dict__["manifest"] = load_manifest(self.path)  # the cached_property, read once
        self.config: ModelConfig = load_config(self.path, verify=verify, manifest=self.manifest if verify else None)
        self._checkpoint: Checkpoint | None = None

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        """The directory's name: the model id a client asks nodes for."""
        return self.path.name

    @cached_property
    def manifest(self) -> Manifest | None:
        return load_manifest(self.path)

    @cached_property
    def identity(self) -> Manifest:
        """The version-2 manifest that names the model on the wire (hashing the files if the
        directory has none; upgrading a version-1 one, written back when the directory is writable)."""
        manifest = self.manifest
        identity = identity_manifest(self.path, manifest)
        if manifest is not None and identity is not manifest:
            self.__dict__["manifest"] = identity  # upgraded: later users see the pieces too
        return identity

    @cached_property
    def digest(self) -> str:
        """The model's identity on the wire: `identity`'s digest."""
        return self.identity.digest

    @property
    def native_quant(self) -> tuple[str, int]:
        """A directory's weights are floats: "auto" keeps them so."""
        return "none", 32

    def checkpoint(self) -> Checkpoint:
        """The directory's weights, one shared reader: a file is checked when first read, not again."""
        if self._checkpoint is None:
            self._checkpoint = Checkpoint(self.path, verify=self.verify,
                                          manifest=self.manifest if self.verify else None)
        return self._checkpoint

    def tokenizer(self) -> Tokenizer | None:
        """The directory's tokenizer, or None when it has no tokenizer.json (ids in, ids out). With a
        manifest, every file it reads (tokenizer, its config, generation config, chat templates: the
        templates are code) is checked against it first, as the weights are."""
        if not (self.path / TOKENIZER_FILE).exists():
            return None
        if self.verify and self.manifest is not None:
            for path in tokenizer_files(self.path):
                self.manifest.verify_file(self.path, path.relative_to(self.path).as_posix())
        return Tokenizer.from_dir(self.path)


OpenModel = ModelDir | GGUFModel


def open_model_dir(model: OpenModel | str | Path, *, verify: bool = True) -> OpenModel:
    """`model` itself when it is open already, else the `.gguf` file or the directory at that path, opened."""
    if isinstance(model, (ModelDir, GGUFModel)):
        return model
    return GGUFModel(model, verify=verify) if is_gguf(model) else ModelDir(model, verify=verify)


def resolve_quant(model: OpenModel, quant: str, group_size: int) -> tuple[str, int]:
    """(quantization, int4 group size) to load `model` with: "auto" is the model's own."""
    return model.native_quant if quant == AUTO_QUANT else (quant, group_size)
