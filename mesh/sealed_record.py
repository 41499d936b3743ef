"""A `PeerRecord` sealed by its peer's libp2p key: what the DHT stores under `/hearth/<model>/<peer>`.

Anyone in the DHT can store a value under any key, so a record must prove who wrote it: the
value is `{"record": PeerRecord bytes, "signature", "author"}` (msgpack), signed with
py-libp2p's `sign_record` over the DHT key and the record bytes (so a signed record cannot be
moved to another key), by the private key whose public key (`author`, libp2p's protobuf
serialization) hashes to the peer id in the key. A withdrawal (a record without addresses) is a
record like any other: only the peer itself can sign one. Checked where a value is stored (the
DHT validator) and where it is read (every lookup).

Signing an announcement costs ~0.1 ms and checking one ~0.2 ms (ed25519), once per refresh
and per record fetched.
"""

from __future__ import annotations

import msgpack
from libp2p.crypto.keys import PrivateKey
from libp2p.peer.id import ID
from libp2p.records.utils import _unmarshal_public_key, sign_record, verify_record

from mesh.discovery import InvalidRecord, PeerRecord

MAX_AUTHOR_BYTES = 1 << 10  # an ed25519 key is 36 bytes serialized; RSA ones run to ~550
MAX_SIGNATURE_BYTES = 1 << 10


def seal(record: PeerRecord, key: str, private_key: PrivateKey) -> bytes:
    """The DHT value of `record` under `key`, signed with `private_key` (the record's peer's)."""
    body = record.to_bytes()
    signature, author = sign_record(private_key, key.encode(), body)
    return msgpack.packb({"record": body, "signature": signature, "author": author}, use_bin_type=True)


def unseal(key: str, value: bytes) -> PeerRecord:
    """The record in `value`, if its author is the peer it names and the signature covers `key`
    and the record; InvalidRecord saying what is wrong otherwise."""
    try:
        sealed = msgpack.unpackb(value, raw=False, max_bin_len=len(value), max_str_len=64, max_array_len=0,
                                 max_map_len=3)
        body, signature, author = sealed["record"], sealed["signature"], sealed["author"]
    except Exception as err:  # any malformed input, whatever msgpack raises
        raise InvalidRecord(f"not a sealed record: {err!r}") from err
    if not all(isinstance(part, bytes) for part in (body, signature, author)):
        raise InvalidRecord("a sealed record's record, signature and author must be bytes")
    if len(author) > MAX_AUTHOR_BYTES or len(signature) > MAX_SIGNATURE_BYTES:
        raise InvalidRecord(f"a sealed record's author ({len(author)} bytes) or signature ({len(signature)} "
                            f"bytes) is too long")
    record = PeerRecord.from_bytes(body)
    try:
        author_id = str(ID.from_pubkey(_unmarshal_public_key(author)))
    except Exception as err:  # protobuf and key parsers raise many kinds
        raise InvalidRecord(f"a sealed record's author is not a public key: {err!r}") from err
    if author_id != record.peer_id:
        raise InvalidRecord(f"record of peer {record.peer_id} signed by {author_id}")
    if not verify_record(signature, author, key.encode(), body):
        raise InvalidRecord(f"the signature of peer {record.peer_id}'s record does not verify under {key[:200]}")
    return record
