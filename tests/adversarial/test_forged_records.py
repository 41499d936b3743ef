"""Forged and pinned discovery records (issue 18, item 1), between libp2p hosts on 127.0.0.1.

Before: any DHT participant could store a record under another peer's key. A "withdrawal"
expiring in an hour hid the victim from every lookup (the validator keeps the later expiry, so
the victim's own refreshes never won again), and a forged record announcing a throughput of 1e9
drew routes to the forger. Now every record is sealed by its peer's key and checked where it is
stored and where it is read, and no record may expire more than the record lifetime (plus a
clock allowance) ahead: the forgeries are refused by every honest peer, and lookups return
exactly what the victim announced.
"""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
import trio
from libp2p.records.validator import BlankValidator

from mesh.dht import NAMESPACE, provider_key, record_key
from mesh.discovery import PeerRecord
from mesh.sealed_record import seal
from tests.mesh.test_dht import MODEL, FakeClock, dht_peer, record_of, wait_for_spans

pytestmark = pytest.mark.timeout(60)
HOUR_S = 3600.0


async def push(discovery, key: str, value: bytes) -> None:
    """Store `value` under `key` here and on the peers closest to it, as the DHT does for anyone."""
    with trio.move_on_after(5):
        await discovery.dht.put_value(key, value)
        await discovery.dht.provide(provider_key(MODEL).hex())


async def test_forged_withdrawals_and_records_do_not_hide_or_redirect_a_peer():
    clock = FakeClock()
    async with dht_peer(clock) as (a, da), dht_peer(clock, a.addrs[0]) as (victim, dv), \
            dht_peer(clock, a.addrs[0]) as (client, dc), dht_peer(clock, a.addrs[0]) as (rogue, dr):
        dr.dht.register_validator(NAMESPACE, BlankValidator())  # the attacker skips every check
        genuine = record_of(victim, 0, 3, clock.now + 30)
        await dv.announce(genuine)
        await wait_for_spans(dc, {victim.peer_id: (0, 3)})

        key = record_key(MODEL, victim.peer_id)
        # later than the victim's record (so each would win), within the lifetime limit (so only
        # the seal refuses them)
        hidden = PeerRecord(victim.peer_id, (), genuine.info, clock.now + 45)  # a withdrawal
        lure = PeerRecord(victim.peer_id, tuple(rogue.addrs), dataclasses.replace(genuine.info, throughput=1e9),
                          clock.now + 45)
        rogue_key = rogue.key_pair.private_key
        forgeries = [
            hidden.to_bytes(),  # unsigned, as the first round accepted
            PeerRecord(victim.peer_id, (), genuine.info, clock.now + HOUR_S).to_bytes(),  # and for an hour
            seal(hidden, key, rogue_key),  # sealed, by the wrong key
            seal(lure, key, rogue_key),
            msgpack.packb({**msgpack.unpackb(seal(hidden, key, rogue_key)),
                           "author": victim.key_pair.public_key.serialize()}, use_bin_type=True),  # the victim's key named
        ]
        for forged in forgeries:
            await push(dr, key, forged)
            for honest in (da, dv, dc):  # refused where stored: honest copies are still the victim's own
                stored = honest.dht.value_store.get(key.encode())
                assert stored is None or PeerRecord.from_bytes(msgpack.unpackb(stored.value)["record"]) == genuine
            records = await dc.lookup(MODEL)
            assert records == [genuine]  # exactly what the victim announced: its addresses, its throughput

        clock.now += 20  # the victim refreshes as usual and is found with its new record
        refreshed = record_of(victim, 0, 3, clock.now + 30)
        await dv.announce(refreshed)
        assert await wait_for_spans(dc, {victim.peer_id: (0, 3)}) == [refreshed]


async def test_a_peer_cannot_pin_even_its_own_record_for_long():
    clock = FakeClock()
    async with dht_peer(clock) as (a, da), dht_peer(clock, a.addrs[0]) as (client, dc), \
            dht_peer(clock, a.addrs[0]) as (rogue, dr):
        dr.dht.register_validator(NAMESPACE, BlankValidator())
        key = record_key(MODEL, rogue.peer_id)
        pinned = record_of(rogue, 0, 3, clock.now + HOUR_S)  # its own key, an hour ahead
        await push(dr, key, seal(pinned, key, rogue.key_pair.private_key))
        assert da.dht.value_store.get(key.encode()) is None
        assert dc.dht.value_store.get(key.encode()) is None
        assert await dc.lookup(MODEL) == []
