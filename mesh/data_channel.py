"""A fast data channel for inference sessions: plain TCP, sealed with a key agreed over libp2p.

py-libp2p's yamux-over-Noise stream costs about 4 ms per decode-step round trip on this machine
(a plain TCP round trip costs 0.1 ms), which for a 3-hop route is most of what a swarm loses
against one process. So a node may offer, in `SessionOpened`, a TCP address, a session token and
a fresh 32-byte key. The offer travels over the authenticated, encrypted libp2p stream, so only
the client that opened the session learns the key: the channel is bound to the libp2p identity
that the allow-list and the session checks saw. Both sides list the capability
`protocol.DATA_CHANNEL` in their Hellos for a node to offer one; the token and key sizes are
`protocol.DATA_TOKEN_BYTES` and `DATA_KEY_BYTES`.

Channel layout: the client connects and sends, in clear, a 16-byte nonce of its own and the first
16 bytes of sha256(label, token, nonce), then records. The node finds the offer whose token gives
that digest; the clear bytes are random, so a node cannot make a client write bytes of its choosing
to whatever address it names (and the client only dials the address it reached the node on). A record
is a 4-byte big-endian length and a ChaCha20-Poly1305 ciphertext (tag included) of up to
`MAX_RECORD_BYTES` plaintext bytes; the nonce is one byte for the direction (0 client -> node,
1 node -> client) and an 11-byte big-endian record counter, so records cannot be reordered,
replayed or reflected. The first client record must hold the token itself (proof of the key).
After that the records carry the session's ordinary protocol frames. Anything that fails to
authenticate closes the channel; the client then fails over, as for any broken stream.

The listener holds at most `MAX_PENDING` connections that have not authenticated yet, and
`MAX_PENDING_PER_IP` from one address; others, and any connection while no offer waits for its
channel, are closed at once.

A client that cannot reach the address keeps using the libp2p stream; the node serves whichever
the client uses first.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
import struct
from dataclasses import dataclass

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from mesh.errors import DialError, StreamClosed, TransportTimeout
from mesh.transport import ByteStream
from protocol import DATA_KEY_BYTES as KEY_BYTES, DATA_TOKEN_BYTES as TOKEN_BYTES

log = logging.getLogger("hearth.mesh")

TAG_BYTES = 16
MAX_RECORD_BYTES = 1 << 20  # plaintext per record; larger writes are split
HANDSHAKE_TIMEOUT_S = 3.0
MAX_PENDING = 64  # connections not yet authenticated, in all
MAX_PENDING_PER_IP = 8
NONCE_BYTES = 16
_LABEL = b"hearth data channel v2"
TO_NODE, TO_CLIENT = 0, 1
_LENGTH = struct.Struct(">I")


class SealedStream(ByteStream):
    """A `ByteStream` over TCP whose every record is encrypted and authenticated."""

    def __init__(self, socket: trio.abc.Stream, key: bytes, peer_id: str, *, sending: int):
        self.peer_id = peer_id
        self._socket, self._aead = socket, ChaCha20Poly1305(key)
        self._send_dir, self._recv_dir = sending, 1 - sending
        self._sent = self._received = 0
        self._raw = bytearray()  # bytes read from the socket, not yet a whole record
        self._plain = b""  # a decrypted record, not yet handed out
        self._lock = trio.StrictFIFOLock()
        self.closed = trio.Event()

    def _nonce(self, direction: int, counter: int) -> bytes:
        return bytes((direction,)) + counter.to_bytes(11, "big")

    async def send_all(self, data: bytes) -> None:
        # Records must reach the socket in nonce order, so writers take turns. A free lock is taken
        # without the scheduling round `Lock.acquire` adds: that round came before every decode
        # step's bytes left, on the client and the node (about 70 us each in bench_swarm).
        if self._lock.locked():
            await self._lock.acquire()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._lock.acquire_nowait()
        try:
            records = []
            for offset in range(0, max(len(data), 1), MAX_RECORD_BYTES):
                plain = data if len(data) <= MAX_RECORD_BYTES else data[offset:offset + MAX_RECORD_BYTES]
                sealed = self._aead.encrypt(self._nonce(self._send_dir, self._sent), plain, None)
                self._sent += 1
                records += (_LENGTH.pack(len(sealed)), sealed)
            try:
                await self._socket.send_all(b"".join(records))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
                raise StreamClosed(self.peer_id, f"data channel write failed ({type(err).__name__})") from err
        finally:
            self._lock.release()

    async def receive_some(self, max_bytes: int) -> bytes:
        if not self._plain:
            record = await self._read_record()
            if record is None:
                return b""
            self._plain = record
        data, self._plain = self._plain[:max_bytes], self._plain[max_bytes:]
        return data

    async def _read_record(self) -> bytes | None:
        """The next record's plaintext; None at a clean end of stream between records."""
        while True:
            if len(self._raw) >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(self._raw)
                if not TAG_BYTES <= length <= MAX_RECORD_BYTES + TAG_BYTES:
                    raise StreamClosed(self.peer_id, f"data channel record of {length} bytes")
                if len(self._raw) >= _LENGTH.size + length:
                    sealed = bytes(self._raw[_LENGTH.size:_LENGTH.size + length])
                    del self._raw[:_LENGTH.size + length]
                    return self._open(sealed)
            try:
                chunk = await self._socket.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
                raise StreamClosed(self.peer_id, f"data channel read failed ({type(err).__name__})") from err
            if not chunk:
                if self._raw:
                    raise StreamClosed(self.peer_id, "data channel ended inside a record")
                return None
            self._raw += chunk

    def _open(self, sealed: bytes) -> bytes:
        try:
            plain = self._aead.decrypt(self._nonce(self._recv_dir, self._received), sealed, None)
        except InvalidTag:
            raise StreamClosed(self.peer_id, "data channel record failed authentication") from None
        self._received += 1
        return plain

    async def aclose(self) -> None:
        self.closed.set()
        with trio.move_on_after(1.0):
            await self._socket.aclose()


@dataclass(frozen=True)
class Offer:
    """What a node tells a client (over libp2p) so that it can open the session's data channel."""

    address: str  # "host:port"
    token: bytes
    key: bytes


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"data channel address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def token_proof(token: bytes, nonce: bytes) -> bytes:
    """What the client sends in clear to name its offer: a digest the node cannot choose."""
    return hashlib.sha256(_LABEL + token + nonce).digest()[:TOKEN_BYTES]


def check_offered_host(address: str, reached: str | None) -> None:
    """ValueError unless the offered address is on the host this client reached the node at over
    libp2p (`reached`; unknown only on in-memory transports, where only loopback is accepted): a
    node must not aim the client's connection at a third party."""
    host, _ = _split_address(address)
    try:
        offered = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"data channel address {address!r} is not an IP address") from None
    if reached is None:
        if not offered.is_loopback:
            raise ValueError(f"data channel address {address!r}: only loopback where the peer's address is unknown")
    elif offered != ipaddress.ip_address(reached):
        raise ValueError(f"data channel address {address!r} is not the host {reached} this node was reached at")


async def connect(offer: Offer, peer_id: str, *, timeout: float) -> SealedStream:
    """Open the data channel a node offered; DialError or TransportTimeout if it cannot be reached."""
    host, port = _split_address(offer.address)
    nonce = secrets.token_bytes(NONCE_BYTES)
    with trio.move_on_after(timeout):
        try:
            socket = await trio.open_tcp_stream(host, port)
        except OSError as err:
            raise DialError(peer_id, f"data channel {offer.address}: {err}") from err
        stream = SealedStream(socket, offer.key, peer_id, sending=TO_NODE)
        try:
            await socket.send_all(nonce + token_proof(offer.token, nonce))
            await stream.send_all(offer.token)
        except (OSError, trio.BrokenResourceError, StreamClosed) as err:
            await socket.aclose()
            raise DialError(peer_id, f"data channel {offer.address}: {err}") from err
        return stream
    raise TransportTimeout(peer_id, f"opening the data channel to {offer.address}", timeout)


class DataChannels:
    """The node's listener: hands each authenticated TCP connection to the session that offered it."""

    def __init__(self, host: str = "127.0.0.1", *, advertise_host: str | None = None):
        self.host, self.advertise_host = host, advertise_host or host
        self.port = 0
        self._offers: dict[bytes, tuple[bytes, str, trio.MemorySendChannel]] = {}
        self._pending: dict[str, int] = {}  # remote IP -> connections not yet authenticated

    @property
    def address(self) -> str:
        return self.address_for(None)

    def address_for(self, reached_on: str | None) -> str:
        """The address to offer a peer that reached this node on `reached_on` (the local IP of its
        libp2p connection): that IP when the listener binds every interface, so a host on two
        networks offers each peer the one it can reach; else the advertised host."""
        host = self.advertise_host
        if reached_on and self.host in ("0.0.0.0", "::") and (":" in reached_on) == (self.host == "::"):
            host = reached_on
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{self.port}"

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handshake, listeners)

    def offer(self, peer_id: str, reached_on: str | None = None) -> tuple[Offer, trio.MemoryReceiveChannel]:
        """A new token and key for one session of `peer_id`, which reached us on local IP `reached_on`
        (if known); its channel arrives on the receiver."""
        token, key = secrets.token_bytes(TOKEN_BYTES), secrets.token_bytes(KEY_BYTES)
        send, receive = trio.open_memory_channel(1)
        self._offers[token] = (key, peer_id, send)
        return Offer(self.address_for(reached_on), token, key), receive

    def withdraw(self, offer: Offer) -> None:
        self._offers.pop(offer.token, None)

    async def _handshake(self, socket: trio.SocketStream) -> None:
        """Authenticate one connection and hand it to its session; trio closes the socket when
        this returns, so it waits until the session has closed the stream. Connections beyond the
        pending limits, or while no offer waits, are closed at once."""
        try:
            remote = socket.socket.getpeername()[0]
        except OSError:
            return
        if not self._offers or sum(self._pending.values()) >= MAX_PENDING \
                or self._pending.get(remote, 0) >= MAX_PENDING_PER_IP:
            log.debug("data channel: connection from %s closed unread (pending limits)", remote)
            return
        self._pending[remote] = self._pending.get(remote, 0) + 1
        stream = None
        try:
            with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
                stream = await self._authenticate(socket)
        finally:
            self._pending[remote] -= 1
            if not self._pending[remote]:
                del self._pending[remote]
        if stream is None:
            return
        await stream.closed.wait()

    def _offer_named(self, nonce: bytes, proof: bytes) -> bytes | None:
        """The token of the pending offer whose proof this is (a node holds a few at a time)."""
        for token in list(self._offers):
            if hmac.compare_digest(token_proof(token, nonce), proof):
                return token
        return None

    async def _authenticate(self, socket: trio.SocketStream) -> SealedStream | None:
        try:
            hello = await _read_exactly(socket, NONCE_BYTES + TOKEN_BYTES)
            token = self._offer_named(hello[:NONCE_BYTES], hello[NONCE_BYTES:]) if hello is not None else None
            entry = self._offers.pop(token, None) if token is not None else None
            if entry is None:
                log.info("data channel: no offer matches; closing")
                return None
            key, peer_id, deliver = entry
            stream = SealedStream(socket, key, peer_id, sending=TO_CLIENT)
            if await stream._read_record() != token:
                log.info("data channel from %s did not prove its key; closing", peer_id)
                return None
            deliver.send_nowait(stream)
            return stream
        except (StreamClosed, OSError, trio.BrokenResourceError, trio.WouldBlock, trio.ClosedResourceError) as err:
            log.info("data channel handshake failed: %r", err)
            return None


async def _read_exactly(socket: trio.abc.ReceiveStream, count: int) -> bytes | None:
    data = bytearray()
    while len(data) < count:
        chunk = await socket.receive_some(count - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)
