"""Files replaced all at once or not at all (manifests, peer caches, identity keys, checkpoints)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_write(path: os.PathLike | str, *, file_mode: int = 0o666, dir_mode: int = 0o777) -> Iterator[BinaryIO]:
    """`with atomic_write(path) as file: file.write(data)` replaces `path` only once the block
    ends without an error, so a reader or a crash sees the old file or the new one, never half.

    The data goes to a hidden temporary file beside `path`, created afresh (never through an
    existing file or link) with `file_mode` (less the umask), flushed to disk, then renamed over
    `path`; it is removed whatever happens. Missing parent directories get `dir_mode`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=dir_mode)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.unlink(missing_ok=True)  # left by a crashed process that had our id
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode)
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
