"""Discovery in the Kademlia DHT between libp2p hosts in this process, on 127.0.0.1."""

from __future__ import annotations

import contextlib
import dataclasses

import msgpack
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.records.validator import BlankValidator

from mesh.dht import (
    MAX_RECORD_BYTES,
    MAX_TTL_S,
    NAMESPACE,
    DhtDiscovery,
    PeerRecordValidator,
    check_record,
    provider_key,
    record_key,
)
from mesh.discovery import RECORD_TTL_S, InvalidRecord, MemoryDirectory, PeerRecord
from mesh.identity import peer_id_of
from mesh.errors import StreamClosed
from mesh.libp2p_transport import Libp2pTransport
from mesh.sealed_record import seal
from protocol import SpanInfo
from tests.mesh.conftest import LOOPBACK

pytestmark = pytest.mark.timeout(60)
MODEL = "5f3a9c"
PROPAGATION_S = 10.0  # bound on polling for records to show up


class FakeClock:
    """The wall clock records expire by, moved by hand."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def record_of(transport: Libp2pTransport, start: int, end: int, expires_at: float, model: str = MODEL) -> PeerRecord:
    info = SpanInfo(model_id="tiny", manifest_hash=model, start=start, end=end)
    return PeerRecord(transport.peer_id, tuple(transport.addrs), info, expires_at)


async def wait_for_spans(discovery: DhtDiscovery, expected: dict[str, tuple[int, int]]) -> list[PeerRecord]:
    """Poll lookups (bounded) until they show exactly `expected` (peer id -> span)."""
    with trio.move_on_after(PROPAGATION_S):
        while True:
            records = await discovery.lookup(MODEL)
            if {r.peer_id: (r.info.start, r.info.end) for r in records} == expected:
                return records
            await trio.sleep(0.05)
    records = await discovery.lookup(MODEL)
    assert {r.peer_id: (r.info.start, r.info.end) for r in records} == expected
    return records


@contextlib.asynccontextmanager
async def dht_peer(clock, bootstrap: str | None = None):
    async with Libp2pTransport(listen=LOOPBACK) as transport:
        if bootstrap is not None:
            await transport.dial(bootstrap, timeout=5)
        async with DhtDiscovery(transport, clock=clock, timeout=5) as discovery:
            yield transport, discovery


async def test_announce_on_one_peer_and_look_up_from_another():
    clock = FakeClock()
    async with dht_peer(clock) as (a, da), dht_peer(clock, a.addrs[0]) as (b, db), \
            dht_peer(clock, a.addrs[0]) as (c, dc):
        await db.announce(record_of(b, 0, 3, clock.now + 30))
        records = await wait_for_spans(dc, {b.peer_id: (0, 3)})
        assert records[0].addrs == tuple(b.addrs)
        await dc.announce(record_of(c, 3, 6, clock.now + 30))
        both = {b.peer_id: (0, 3), c.peer_id: (3, 6)}
        for discovery in (da, db, dc):
            await wait_for_spans(discovery, both)
        assert await dc.lookup("some-other-model") == []


async def test_expired_records_are_dropped_and_a_refresh_brings_them_back():
    clock = FakeClock()
    async with dht_peer(clock) as (a, da), dht_peer(clock, a.addrs[0]) as (b, db):
        await db.announce(record_of(b, 0, 3, clock.now + 30))
        await wait_for_spans(da, {b.peer_id: (0, 3)})
        clock.now += 31
        assert await da.lookup(MODEL) == []
        assert await db.lookup(MODEL) == []
        await db.announce(record_of(b, 0, 4, clock.now + 30))
        await wait_for_spans(da, {b.peer_id: (0, 4)})


async def test_records_survive_the_bootstrap_host_leaving():
    clock = FakeClock()
    leave = trio.Event()

    async def run_bootstrap(task_status=trio.TASK_STATUS_IGNORED):
        async with dht_peer(clock) as (a, _):
            task_status.started(a.addrs[0])
            await leave.wait()

    async with trio.open_nursery() as nursery:
        bootstrap = await nursery.start(run_bootstrap)
        async with dht_peer(clock, bootstrap) as (b, db), dht_peer(clock, bootstrap) as (c, dc):
            await db.announce(record_of(b, 0, 3, clock.now + 30))
            await dc.announce(record_of(c, 3, 6, clock.now + 30))
            both = {b.peer_id: (0, 3), c.peer_id: (3, 6)}
            await wait_for_spans(db, both)
            await wait_for_spans(dc, both)
            leave.set()
            await wait_for_spans(db, both)
            await wait_for_spans(dc, both)
            # a refresh after the bootstrap host left still reaches the other peer
            await db.announce(record_of(b, 0, 4, clock.now + 60))
            await wait_for_spans(dc, {b.peer_id: (0, 4), c.peer_id: (3, 6)})
            # and a newcomer that only knows c finds both
            async with dht_peer(clock, c.addrs[0]) as (_, dd):
                await wait_for_spans(dd, {b.peer_id: (0, 4), c.peer_id: (3, 6)})


async def test_withdrawn_record_disappears():
    clock = FakeClock()
    async with dht_peer(clock) as (a, da), dht_peer(clock, a.addrs[0]) as (b, db):
        await db.announce(record_of(b, 0, 3, clock.now + 30))
        await wait_for_spans(da, {b.peer_id: (0, 3)})
        await db.withdraw(b.peer_id, MODEL)
        await wait_for_spans(da, {})
        assert await db.lookup(MODEL) == []


async def test_garbage_from_a_rogue_peer_is_refused_where_stored_and_where_read():
    clock = FakeClock()
    async with dht_peer(clock) as (a, da), dht_peer(clock, a.addrs[0]) as (b, db), \
            dht_peer(clock, a.addrs[0]) as (rogue, dr):
        dr.dht.register_validator(NAMESPACE, BlankValidator())  # the rogue skips our checks
        key = record_key(MODEL, rogue.peer_id)
        await dr.dht.put_value(key, b"\xc1 garbage")
        await dr.dht.provide(provider_key(MODEL).hex())
        await db.announce(record_of(b, 0, 3, clock.now + 30))
        await wait_for_spans(da, {b.peer_id: (0, 3)})
        assert da.dht.value_store.get(key.encode()) is None
        assert db.dht.value_store.get(key.encode()) is None
        assert [r.peer_id for r in await db.lookup(MODEL)] == [b.peer_id]


async def test_operations_are_bounded_when_dht_peers_never_answer():
    async def black_hole(raw):
        with contextlib.suppress(StreamClosed):
            while await raw.receive_some(1 << 16):
                pass

    clock = FakeClock()
    async with Libp2pTransport(listen=LOOPBACK) as silent:
        silent.set_handler(str(KAD_PROTOCOL_ID), black_hole)  # speaks the DHT protocol, never answers
        async with dht_peer(clock, silent.addrs[0]) as (b, db):
            db.timeout = 1.0
            for operation in (db.announce(record_of(b, 0, 3, clock.now + 30)), db.lookup(MODEL)):
                started = trio.current_time()
                await operation
                assert trio.current_time() - started < 2.0  # libp2p alone waits 10 s per query
            assert await db.lookup(MODEL) != []  # still served from the local store


async def test_announcing_another_peers_record_is_refused():
    clock = FakeClock()
    async with dht_peer(clock) as (a, da), Libp2pTransport(listen=LOOPBACK) as other:
        with pytest.raises(InvalidRecord, match="cannot announce"):
            await da.announce(record_of(other, 0, 3, clock.now + 30))


def identity() -> tuple[KeyPair, str]:
    key_pair = create_new_key_pair()
    return key_pair, peer_id_of(key_pair)


def sealed_record(key_pair: KeyPair, expires_at: float, *, model: str = MODEL, addrs=("/a",),
                  key: str | None = None) -> tuple[str, bytes, PeerRecord]:
    info = SpanInfo(model_id="tiny", manifest_hash=model, start=0, end=3)
    record = PeerRecord(peer_id_of(key_pair), tuple(addrs), info, expires_at)
    key = key or record_key(model, record.peer_id)
    return key, seal(record, key, key_pair.private_key), record


def test_validator_checks_key_size_seal_and_contents():
    key_pair, peer = identity()
    key, value, good = sealed_record(key_pair, 100.0)
    assert check_record(key, value) == good
    with pytest.raises(InvalidRecord, match="not a sealed record"):
        check_record(key, b"\xc1 not msgpack")
    with pytest.raises(InvalidRecord, match="not a sealed record"):
        check_record(key, good.to_bytes())  # the unsigned records of the first round
    with pytest.raises(InvalidRecord, match="exceeds"):
        check_record(key, b"\x00" * (MAX_RECORD_BYTES + 1))
    other_pair, other = identity()
    with pytest.raises(InvalidRecord, match="stored under peer"):
        check_record(record_key(MODEL, other), sealed_record(key_pair, 100.0, key=record_key(MODEL, other))[1])
    with pytest.raises(InvalidRecord, match="does not verify"):
        check_record(record_key(MODEL, other), value)  # moved to another key: the signature covers the key
    other_model = record_key("othermodel", peer)
    with pytest.raises(InvalidRecord, match="stored under model"):
        check_record(other_model, sealed_record(key_pair, 100.0, key=other_model)[1])
    for bad_key in ("/hearth/only-model", "/other/m/p", "hearth/m/p", "/hearth//p", "/hearth/m/p/extra"):
        with pytest.raises(InvalidRecord):
            check_record(bad_key, value)
    assert check_record(key, value, now=100.0 - MAX_TTL_S) == good
    with pytest.raises(InvalidRecord, match="the limit is"):
        check_record(key, value, now=100.0 - MAX_TTL_S - 1)  # would pin the key too long
    assert MAX_TTL_S <= RECORD_TTL_S + 30.0
    for never in (float("inf"), float("nan")):
        with pytest.raises(InvalidRecord, match="expires at"):
            check_record(key, sealed_record(key_pair, never)[1])


def test_a_record_signed_by_another_key_or_tampered_with_is_refused():
    victim, victim_id = identity()
    forger, _ = identity()
    key, honest, record = sealed_record(victim, 100.0)
    forged = msgpack.packb({"record": dataclasses.replace(record, addrs=()).to_bytes(), "signature": b"\0" * 64,
                            "author": victim.public_key.serialize()}, use_bin_type=True)
    with pytest.raises(InvalidRecord, match="does not verify"):
        check_record(key, forged)  # the victim's key named, the signature made up
    wrapped = msgpack.unpackb(seal(dataclasses.replace(record, addrs=()), key, forger.private_key))
    with pytest.raises(InvalidRecord, match="signed by"):
        check_record(key, msgpack.packb(wrapped, use_bin_type=True))  # the forger's own signature
    tampered = msgpack.unpackb(honest)
    tampered["record"] = dataclasses.replace(record, expires_at=130.0).to_bytes()
    with pytest.raises(InvalidRecord, match="does not verify"):
        check_record(key, msgpack.packb(tampered, use_bin_type=True))
    for junk in ({"record": b"x", "signature": b"y"}, {"record": "x", "signature": b"y", "author": b"z"},
                 {"record": b"x", "signature": b"y", "author": b"z" * 2000}):
        with pytest.raises(InvalidRecord):
            check_record(key, msgpack.packb(junk, use_bin_type=True))


def test_validator_selects_the_record_that_expires_last():
    key_pair, _ = identity()
    (key, older, _), (_, newer, _) = sealed_record(key_pair, 100.0), sealed_record(key_pair, 130.0)
    _, pinned, _ = sealed_record(key_pair, 1e12)
    validator = PeerRecordValidator(FakeClock(90.0))
    assert validator.select(key, [older, newer]) == 1
    assert validator.select(key, [newer, older]) == 0
    assert validator.select(key, [b"garbage", older]) == 1
    assert validator.select(key, [older, pinned]) == 0


async def test_a_stuck_network_lookup_falls_back_to_records_held_until_they_expire(monkeypatch):
    """A frozen DHT peer can hold every query up; a lookup then returns the unexpired records it
    found before, after the short warm timeout, instead of nothing after the full one."""
    clock = FakeClock()
    async with dht_peer(clock) as (a, da), dht_peer(clock, a.addrs[0]) as (b, db):
        await db.announce(record_of(b, 0, 3, clock.now + 30))
        await wait_for_spans(da, {b.peer_id: (0, 3)})

        async def stuck(model_key, found):
            await trio.sleep_forever()

        monkeypatch.setattr(da, "_find_providers", stuck)
        started = trio.current_time()
        assert [r.peer_id for r in await da.lookup(MODEL)] == [b.peer_id]
        assert trio.current_time() - started < da.warm_timeout + 1.0
        clock.now += 31  # the held record expires like any other
        assert await da.lookup(MODEL) == []


async def test_the_memory_directory_forgets_records_once_they_expire():
    """Crashed peers never withdraw; their records must not pile up in a long simulation."""
    clock = FakeClock(0.0)
    directory = MemoryDirectory(clock)
    for peer, expires_at in (("short", 10.0), ("long", 100.0)):
        info = SpanInfo(model_id="tiny", manifest_hash=MODEL, start=0, end=2)
        await directory.announce(PeerRecord(peer, (f"/memory/{peer}/p2p/{peer}",), info, expires_at))
    assert [r.peer_id for r in await directory.lookup(MODEL)] == ["long", "short"]
    clock.now = 50.0
    assert [r.peer_id for r in await directory.lookup(MODEL)] == ["long"]
    assert list(directory.records) == [(MODEL, "long")]


async def test_the_memory_directory_returns_fresh_records_in_peer_order_through_refreshes():
    clock = FakeClock(0.0)
    directory = MemoryDirectory(clock)

    async def announce(peer: str, expires_at: float, sessions: int = 0) -> None:
        info = SpanInfo(model_id="tiny", manifest_hash=MODEL, start=0, end=2, sessions=sessions)
        await directory.announce(PeerRecord(peer, (f"/memory/{peer}/p2p/{peer}",), info, expires_at))

    for peer in ("c", "a", "b"):
        await announce(peer, 10.0)
    assert [r.peer_id for r in await directory.lookup(MODEL)] == ["a", "b", "c"]
    await announce("b", 20.0, sessions=3)  # a refresh takes its place in the order
    await announce("d", 20.0)  # a newcomer
    records = await directory.lookup(MODEL)
    assert [(r.peer_id, r.info.sessions) for r in records] == [("a", 0), ("b", 3), ("c", 0), ("d", 0)]
    clock.now = 9.8
    assert len(await directory.lookup(MODEL)) == 4
    clock.now = 10.5  # a and c expired, within the prune interval: skipped all the same
    assert [r.peer_id for r in await directory.lookup(MODEL)] == ["b", "d"]
    assert len(directory.records) == 4  # forgotten at the next prune
    clock.now = 11.0
    assert [r.peer_id for r in await directory.lookup(MODEL)] == ["b", "d"] and len(directory.records) == 2
    await directory.withdraw("d", MODEL)
    await directory.withdraw("nobody", MODEL)
    assert [r.peer_id for r in await directory.lookup(MODEL)] == ["b"]
    assert await directory.lookup("another model") == []
