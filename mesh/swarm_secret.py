"""Household mode: one shared secret that both admits peers to a node and makes nodes trusted by a client.

Every peer of a private swarm holds the same secret (`--swarm-secret FILE`). A peer proves it knows
it by sending, in its `Hello`, `proof(peer_id)`: HMAC-SHA256 of its own peer id under the secret
(with a label, so the key serves nothing else). The peer id is the one libp2p's Noise handshake
authenticated (the in-memory transport's is trusted by construction), so a proof is worth nothing
to any other peer: one who learns it cannot present it under its own id, and cannot speak under
the id it belongs to without that peer's private key. No nonce is needed for the same reason.

Both directions are checked: a node answers a client's `Hello` (on info and inference streams)
only when it carries a valid proof, and refuses otherwise before sending anything of its own; a
client plans only on nodes whose `Hello` carried one, and checks it again on every session it
opens. What the secret does not hide: the DHT stays open, so outsiders still see records (peer
ids, addresses, spans) and peers' connections; docs/security.md says so.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from protocol import SWARM_PROOF_BYTES
from shard.errors import InvalidInput

MIN_SECRET_BYTES = 16  # 128 bits: an HMAC key no one guesses; `head -c 32 /dev/urandom | base64` makes one
LABEL = b"hearth swarm proof v1\x00"  # domain separation: a proof is HMAC(secret, LABEL || peer id)


@dataclass(frozen=True)
class SwarmSecret:
    """The household's shared secret (key bytes, never printed) and the proofs made from it."""

    key: bytes = field(repr=False)

    def __post_init__(self):
        if not isinstance(self.key, bytes) or len(self.key) < MIN_SECRET_BYTES:
            size = len(self.key) if isinstance(self.key, bytes) else type(self.key).__name__
            raise InvalidInput(f"a swarm secret needs at least {MIN_SECRET_BYTES} bytes, got {size} "
                               f"(make one with: head -c 32 /dev/urandom | base64 > FILE)")

    @classmethod
    def from_text(cls, text: bytes) -> SwarmSecret:
        """The secret as a file holds it: surrounding whitespace (a trailing newline) is not part of it."""
        return cls(text.strip())

    def proof(self, peer_id: str) -> bytes:
        """What `peer_id` sends in its Hello to show it holds this secret."""
        digest = hmac.new(self.key, LABEL + peer_id.encode(), hashlib.sha256).digest()
        return digest[:SWARM_PROOF_BYTES]

    def verify(self, peer_id: str, proof: bytes) -> bool:
        """Whether `proof` is `peer_id`'s (in constant time)."""
        return hmac.compare_digest(self.proof(peer_id), proof)


def proof_of(secret: SwarmSecret | None, peer_id: str) -> bytes:
    """What a peer puts in its Hello: its proof, or nothing outside household mode."""
    return b"" if secret is None else secret.proof(peer_id)


def refusal_reason(secret: SwarmSecret | None, peer_id: str, proof: bytes) -> str | None:
    """None when `peer_id` may be dealt with under `secret` (or there is none); else why not."""
    if secret is None or secret.verify(peer_id, proof):
        return None
    shown = "no proof" if not proof else "a wrong proof"
    return f"peer {peer_id} gave {shown} of this swarm's secret"
