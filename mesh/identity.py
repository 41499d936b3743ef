"""Peer identity: the ed25519 key pair a peer is known by, persisted in a private file.

The file holds libp2p's protobuf serialization of the private key. It is created on first use
with mode 0600 (written to a temporary file, then renamed, so a crash never leaves half a key),
and a file that others can read is refused, as ssh refuses a readable private key.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.peer.id import ID

from shard.atomic_file import atomic_write

log = logging.getLogger(__name__)

MAX_KEY_FILE_BYTES = 4096


class IdentityError(ValueError):
    """The identity file at `path` cannot be used."""

    def __init__(self, path: os.PathLike | str, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"identity file {path}: {reason}")


def load_or_create_identity(path: os.PathLike | str | None) -> KeyPair:
    """The key pair stored at `path`, created there on first use; a fresh one for None."""
    if path is None:
        return create_new_key_pair()
    path = Path(path)
    if path.exists():
        return _load(path)
    key_pair = create_new_key_pair()
    with atomic_write(path, file_mode=0o600, dir_mode=0o700) as file:
        file.write(key_pair.private_key.serialize())
    log.info("created identity %s at %s", ID.from_pubkey(key_pair.public_key), path)
    return key_pair


def peer_id_of(key_pair: KeyPair) -> str:
    return str(ID.from_pubkey(key_pair.public_key))


def _load(path: Path) -> KeyPair:
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise IdentityError(path, "not a regular file")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(path, f"readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 it")
    data = path.read_bytes()
    if len(data) > MAX_KEY_FILE_BYTES:
        raise IdentityError(path, f"{len(data)} bytes is too large for a private key")
    try:
        private_key = deserialize_private_key(data)
    except Exception as err:  # protobuf and key parsers raise many kinds
        raise IdentityError(path, f"not a serialized libp2p private key ({err!r})") from err
    if private_key.get_type() is not KeyType.Ed25519:
        raise IdentityError(path, f"holds a {private_key.get_type().name} key, not ed25519")
    return KeyPair(private_key, private_key.get_public_key())
