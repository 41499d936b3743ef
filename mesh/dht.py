"""Discovery over libp2p's Kademlia DHT: who serves which model, as records with an expiry.

Layout in the DHT, for a model whose manifest digest is `model_key`:

- `/hearth/<model_key>/<peer_id>` -> `PeerRecord.to_bytes()` of that peer (a DHT value), and
- the peer is a provider of `provider_key(model_key)`, the index of who has a value there.

`lookup` asks the peers closest to the provider key for their providers, then fetches each
provider's value, and keeps the unexpired records that have addresses. Every peer runs the DHT
in server mode, so the values and the provider index live on several peers and survive losing
any one of them, the bootstrap host included. A record without addresses is a withdrawal: it
replaces the live record (validators prefer the later `expires_at`) until both would have
expired anyway.

Every value is sealed by its peer's key (`mesh.sealed_record`) and checked where it is stored
and where it is read, so no one can announce, withdraw or pin another peer's record; and an
expiry more than `MAX_TTL_S` (the record lifetime plus a clock allowance) ahead is refused, so a
peer cannot pin even its own key for long.

Works around two py-libp2p 0.8.1 behaviours: `find_providers` answers from the local store
alone once it holds any provider (a node that announced itself would never see the others), so
we query the closest peers ourselves; and `get_value` returns any local copy before asking the
network, so an expired local copy is dropped before each fetch (a refreshed record is then found).
Only the `/hearth/`, `/pk/` and `/ipns/` namespaces are accepted (strict validation), so the DHT
cannot be used to park arbitrary data on our peers.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Callable

import trio
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.records.validator import Validator
from libp2p.tools.anyio_service import background_trio_service

from mesh import provider_policy
from mesh.discovery import RECORD_TTL_S, Discovery, InvalidRecord, PeerRecord
from mesh.libp2p_transport import Libp2pTransport
from mesh.sealed_record import seal, unseal

log = logging.getLogger(__name__)

NAMESPACE = "hearth"
MAX_RECORD_BYTES = 8 << 10
CLOCK_ALLOWANCE_S = 30.0  # how far ahead of ours another peer's wall clock may run
MAX_TTL_S = RECORD_TTL_S + CLOCK_ALLOWANCE_S  # the furthest ahead a record may expire
DEFAULT_TIMEOUT_S = 10.0
# A lookup that already holds unexpired records of the model waits this long for the network:
# one frozen DHT peer can hold up every query that reaches it for the full timeout, which would
# stall each failover while the peer is frozen. What arrives in time replaces the held copies.
WARM_LOOKUP_TIMEOUT_S = 2.0
MAX_PROVIDERS = 256  # records fetched per lookup
PARALLEL_FETCHES = 16
WITHDRAWAL_NUDGE_S = 1e-3  # a withdrawal's expiry is this much later than the record it replaces
_SHA2_256 = b"\x12\x20"  # multihash prefix: sha2-256, 32 bytes


def record_key(model_key: str, peer_id: str) -> str:
    return f"/{NAMESPACE}/{model_key}/{peer_id}"


def provider_key(model_key: str) -> bytes:
    """The DHT key (a sha2-256 multihash) under which a model's servers are providers."""
    return _SHA2_256 + hashlib.sha256(f"/{NAMESPACE}/providers/{model_key}".encode()).digest()


def parse_record_key(key: str) -> tuple[str, str]:
    """(model_key, peer_id) of `/hearth/<model_key>/<peer_id>`; InvalidRecord otherwise."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] or parts[1] != NAMESPACE or not parts[2] or not parts[3]:
        raise InvalidRecord(f"key {key[:200]!r} is not /{NAMESPACE}/<model>/<peer id>")
    return parts[2], parts[3]


def check_record(key: str, value: bytes, *, now: float | None = None) -> PeerRecord:
    """The record stored under `key`, if it is well formed, sealed by its peer and belongs
    there; InvalidRecord otherwise.

    With `now`, an expiry more than `MAX_TTL_S` ahead is refused too: a far-future record would
    otherwise win every `select` and pin the key.
    """
    if len(value) > MAX_RECORD_BYTES:
        raise InvalidRecord(f"record of {len(value)} bytes exceeds {MAX_RECORD_BYTES}")
    model_key, peer_id = parse_record_key(key)
    record = unseal(key, value)
    if record.peer_id != peer_id:
        raise InvalidRecord(f"record of peer {record.peer_id} stored under peer {peer_id}")
    if record.info.manifest_hash != model_key:
        raise InvalidRecord(f"record for model {record.info.manifest_hash} stored under model {model_key}")
    if not math.isfinite(record.expires_at):
        raise InvalidRecord(f"record expires at {record.expires_at}")
    if now is not None and record.expires_at > now + MAX_TTL_S:
        raise InvalidRecord(f"record expires {record.expires_at - now:.0f} s from now; the limit is {MAX_TTL_S:g} s")
    return record


class PeerRecordValidator(Validator):
    """The DHT's check of `/hearth/` values, run where they are stored and where they are read."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock

    def validate(self, key: str, value: bytes) -> None:
        check_record(key, value, now=self.clock())

    def select(self, key: str, values: list[bytes]) -> int:
        """The value that expires last (the most recent announcement or withdrawal)."""
        now = self.clock()

        def expiry(value: bytes) -> float:
            try:
                return check_record(key, value, now=now).expires_at
            except InvalidRecord:
                return float("-inf")

        return max(range(len(values)), key=lambda i: expiry(values[i]))


class DhtDiscovery(Discovery):
    """Discovery in the Kademlia DHT of a `Libp2pTransport`'s host.

    Use as `async with DhtDiscovery(transport, clock=time.time) as discovery:` inside the
    transport's context. `clock` is the wall clock records expire by; `timeout` bounds each
    announce, withdraw and lookup. Lookups keep the records they found until those expire, and
    merge them into later lookups, which then wait only `warm_timeout` for the network.
    """

    def __init__(self, transport: Libp2pTransport, *, clock: Callable[[], float],
                 timeout: float = DEFAULT_TIMEOUT_S, warm_timeout: float = WARM_LOOKUP_TIMEOUT_S):
        self.transport, self.clock, self.timeout = transport, clock, timeout
        self.warm_timeout = min(warm_timeout, timeout)
        self._seen: dict[str, dict[str, PeerRecord]] = {}  # model key -> peer id -> latest record found
        self.dht = KadDHT(transport.host, DHTMode.SERVER, strict_validation=True)
        self.dht.register_validator(NAMESPACE, PeerRecordValidator(clock))
        self.providers = provider_policy.install(self.dht, transport.host)  # newcomers are never crowded out
        self._announced: dict[str, PeerRecord] = {}  # model key -> our latest record
        self._fetch_limiter = trio.CapacityLimiter(PARALLEL_FETCHES)
        self._stack: contextlib.AsyncExitStack | None = None

    async def __aenter__(self) -> DhtDiscovery:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(background_trio_service(self.dht))
            await self._add_connected_peers(self.timeout)
            self._stack = stack.pop_all()
        return self

    async def _add_connected_peers(self, timeout: float) -> None:
        """Put the peers we are connected to (bootstrap hosts, LAN peers found by mDNS since) in
        the routing table; adding may ping a peer when a bucket is full, hence the bound."""
        table = self.dht.routing_table
        with trio.move_on_after(timeout):
            for peer in self.transport.host.get_connected_peers():
                if not table.peer_in_table(peer):
                    await self.dht.add_peer(peer)

    async def __aexit__(self, *exc_info) -> bool | None:
        stack, self._stack = self._stack, None
        return await stack.__aexit__(*exc_info)

    async def announce(self, record: PeerRecord) -> None:
        """Publish our record (InvalidRecord if it is not ours or malformed). A network that does
        not answer in time is logged, not raised: the record is held locally and served from
        here, and the next refresh pushes it again."""
        if record.peer_id != self.transport.peer_id:
            raise InvalidRecord(f"peer {self.transport.peer_id} cannot announce peer {record.peer_id}")
        key = record_key(record.info.manifest_hash, record.peer_id)
        value = seal(record, key, self.transport.key_pair.private_key)
        check_record(key, value, now=self.clock())
        self._announced[record.info.manifest_hash] = record
        await self._publish(key, value, record.info.manifest_hash, "announce")

    async def withdraw(self, peer_id: str, model_key: str) -> None:
        """Replace our record with one without addresses (best effort: copies cached by readers
        stay until they expire)."""
        record = self._announced.pop(model_key, None)
        if record is None or peer_id != self.transport.peer_id:
            return
        expires_at = max(record.expires_at, self.clock()) + WITHDRAWAL_NUDGE_S
        withdrawal, key = PeerRecord(peer_id, (), record.info, expires_at), record_key(model_key, peer_id)
        await self._publish(key, seal(withdrawal, key, self.transport.key_pair.private_key), model_key, "withdraw")

    async def lookup(self, model_key: str) -> list[PeerRecord]:
        """Unexpired records with addresses; what arrived in time if the lookup times out."""
        found: dict[str, PeerRecord] = {}
        started = trio.current_time()
        await self._add_connected_peers(self.warm_timeout)
        seen = {peer: r for peer, r in self._seen.get(model_key, {}).items() if not r.expired(self.clock())}
        timeout = self.warm_timeout if seen else self.timeout
        with trio.move_on_after(timeout) as scope:
            async with trio.open_nursery() as nursery:
                fetching: set[ID] = set()

                def fetch(peer: ID) -> None:  # as each provider turns up, local ones first
                    if peer not in fetching and len(fetching) < MAX_PROVIDERS:
                        fetching.add(peer)
                        nursery.start_soon(self._fetch_record, model_key, peer, found)

                await self._find_providers(model_key, fetch)
        if scope.cancelled_caught:
            log.log(logging.INFO if seen else logging.WARNING, "lookup of %s timed out after %g s with %d records "
                    "(%d held from earlier lookups)", model_key, timeout, len(found), len(seen))
        now = self.clock()
        for peer, record in found.items():  # a withdrawal (no addresses) replaces a held record too
            if peer not in seen or record.expires_at >= seen[peer].expires_at:
                seen[peer] = record
        self._seen[model_key] = seen
        records = sorted((r for r in seen.values() if r.addrs and not r.expired(now)), key=lambda r: r.peer_id)
        log.debug("lookup of %s: %d records in %.1f ms", model_key, len(records),
                  1000 * (trio.current_time() - started))
        return records

    async def _publish(self, key: str, value: bytes, model_key: str, what: str) -> None:
        self.dht.value_store.remove(key.encode())  # our latest value replaces our older one
        with trio.move_on_after(self.timeout) as scope:
            async with trio.open_nursery() as nursery:  # each stores locally first, then pushes
                nursery.start_soon(self.dht.put_value, key, value)
                nursery.start_soon(self.dht.provide, provider_key(model_key).hex())
        if scope.cancelled_caught:
            log.warning("%s of %s did not reach the network within %g s", what, key, self.timeout)

    async def _find_providers(self, model_key: str, found: Callable[[ID], None]) -> None:
        """Report the providers known here, then those the peers closest to the provider key know."""
        key = provider_key(model_key)
        store = self.dht.provider_store
        for info in store.get_providers(key):
            found(info.peer_id)
        closest = await self.dht.peer_routing.find_closest_peers_network(key)

        async def ask(peer: ID) -> None:
            try:
                answer, _closer = await store._get_providers_from_peer_with_closers(peer, key)
            except Exception as err:  # it catches its own errors today; a lookup must not die of one
                log.debug("asking %s for providers failed: %r", peer, err)
                return
            for info in answer:
                found(info.peer_id)

        async with trio.open_nursery() as nursery:
            for peer in closest:
                if peer != self.dht.local_peer_id:
                    nursery.start_soon(ask, peer)

    async def _fetch_record(self, model_key: str, peer: ID, found: dict[str, PeerRecord]) -> None:
        key = record_key(model_key, str(peer))
        self._drop_expired_copy(key)
        try:
            async with self._fetch_limiter:
                value = await self.dht.get_value(key)
        except Exception as err:  # libp2p raises assorted errors for unreachable peers
            log.debug("fetching %s failed: %r", key, err)
            return
        if value is None:
            return
        try:
            found[str(peer)] = check_record(key, value, now=self.clock())
        except InvalidRecord as err:
            log.info("dropping a bad record under %s: %s", key, err)

    def _drop_expired_copy(self, key: str) -> None:
        """Forget a local copy that has expired, so `get_value` asks the network for a fresh one."""
        local = self.dht.value_store.get(key.encode())
        if local is None:
            return
        try:
            expired = check_record(key, local.value).expired(self.clock())
        except InvalidRecord:
            expired = True
        if expired:
            self.dht.value_store.remove(key.encode())
