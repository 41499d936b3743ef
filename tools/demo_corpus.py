"""The demo model's corpus: the Python standard library's own source, split into train and held-out files.

Shared by `train_demo_model.py` and `eval_demo_model.py` so both see the same split. Every machine
with Python has this corpus offline; its exact bytes depend on the Python version (the version
trained on is recorded in the model card and in `training.json`).

Selection: every `*.py` file under `sysconfig.get_paths()["stdlib"]`, sorted by relative POSIX
path, except those inside a directory named like a test suite (`test`, `tests`, `idle_test`) or
`site-packages`, and the two packages that are data rather than code: `pydoc_data` (the docs as one
giant string) and `encodings` (generated codec tables). Every `HOLDOUT_EVERY`-th file of that
sorted list (indices 0, 50, 100, ...) is held out for evaluation.
"""

from __future__ import annotations

import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "pydoc_data", "encodings", "__pycache__"})
HOLDOUT_EVERY = 50
END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative POSIX path under the stdlib directory
    text: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_version() -> str:
    return ".".join(str(part) for part in sys.version_info[:3])


def corpus_files(root: Path | None = None) -> list[SourceFile]:
    """Every selected source file, sorted by path; files that are not valid UTF-8 are skipped."""
    root = root or stdlib_dir()
    selected = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(relative.parts[:-1]) or not path.is_file():
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        selected.append(SourceFile(relative.as_posix(), text))
    return sorted(selected, key=lambda f: f.path)


def split_files(files: list[SourceFile]) -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, held out): every HOLDOUT_EVERY-th file, by sorted position, is held out."""
    train = [f for i, f in enumerate(files) if i % HOLDOUT_EVERY]
    held_out = [f for i, f in enumerate(files) if not i % HOLDOUT_EVERY]
    return train, held_out


def document_text(file: SourceFile) -> str:
    """One file as the model sees it: its text, then the end-of-text marker."""
    return file.text + END_OF_TEXT
