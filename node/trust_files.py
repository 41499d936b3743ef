"""The files that say whom to deal with: lists of peer ids (a node's `--allow-peers`, a client's
`--trust-peers`) and a household's shared secret (`--swarm-secret`, `mesh.swarm_secret`).

A peer list holds one peer id per line; blank lines and everything after a `#` are ignored. A
secret file holds the secret (at least 16 bytes; surrounding whitespace is not part of it). Errors
name the flag and the file, in one line.
"""

from __future__ import annotations

from pathlib import Path

from mesh.swarm_secret import SwarmSecret
from shard.errors import InvalidInput


def read_peer_ids(path: Path, *, flag: str) -> frozenset[str]:
    """The peer ids listed in `path` (given as `flag`)."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) else "not a text file"
        raise InvalidInput(f"cannot read {flag} file {path}: {why}") from err
    peers = set()
    for number, line in enumerate(lines, start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if len(entry.split()) != 1:
            raise InvalidInput(f"{flag} file {path}, line {number}: expected one peer id, got {entry!r}")
        peers.add(entry)
    return frozenset(peers)


def read_swarm_secret(path: Path, *, flag: str = "--swarm-secret") -> SwarmSecret:
    """The household secret kept in `path`."""
    try:
        text = Path(path).read_bytes()
    except OSError as err:
        raise InvalidInput(f"cannot read {flag} file {path}: {err.strerror}") from err
    try:
        return SwarmSecret.from_text(text)
    except InvalidInput as err:
        raise InvalidInput(f"{flag} file {path}: {err}") from None
