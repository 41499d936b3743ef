"""`hearth manifest DIR|FILE`: a model's identity, and for a directory its hearth-manifest.json.

A directory: hashes every file (each once: its sha256 and its pieces) and writes or refreshes
`hearth-manifest.json` (version 2) beside them. A GGUF file: hashes it; nothing is written (its
identity is a manifest of the file alone). Either way the LAST line printed is the model's digest,
the hex string `--model-digest` takes and every node announces the model under.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="DIR|FILE.gguf",
                        help="a model directory (config.json and safetensors) or a GGUF file")


def run(args: argparse.Namespace) -> int:
    from shard.config import load_config
    from shard.gguf_file import GGUFModel, is_gguf
    from shard.manifest import build_manifest, save_manifest

    path = Path(args.model)
    if not path.exists():
        return _bad(f"{path}: no such file or directory")
    if is_gguf(path):
        model = GGUFModel(path)  # refuses a file that is not a model, in one line
        print(f"{path} is a GGUF file: its identity is a manifest of the file alone (nothing written)")
        print(model.digest)
        return 0
    if not path.is_dir():
        return _bad(f"{path} is neither a model directory nor a GGUF file")
    load_config(path, verify=False)  # not a model (no or a bad config.json): ConfigError, one line
    manifest = build_manifest(path)
    target = save_manifest(path, manifest)
    print(f"wrote {target} ({len(manifest.files)} files, pieces of {manifest.piece_bytes} bytes)")
    print(manifest.digest)
    return 0


def _bad(text: str) -> int:
    print(f"hearth manifest: error: {text}", file=sys.stderr)
    return EXIT_BAD_INPUT
