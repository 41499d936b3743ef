"""Provider flooding (issue 18, item 2), between libp2p hosts on 127.0.0.1.

Before: py-libp2p keeps 20 providers per key and ignores newcomers, for 48 hours. Twenty
throwaway identities registered as providers of the model filled every peer's index, and a node
announced afterwards was never found. Now a full index makes room by evicting the stalest
provider of the most represented origin (the address a provider connects from): the attacker's
identities, all from one address (here 127.0.0.2), only ever displace each other.
"""

from __future__ import annotations

import contextlib
import contextvars

import pytest
import trio
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID

import mesh.provider_policy
from mesh.dht import provider_key
from mesh.libp2p_transport import Libp2pTransport
from tests.mesh.test_dht import MODEL, FakeClock, dht_peer, record_of, wait_for_spans

pytestmark = pytest.mark.timeout(90)
ATTACKER_IP = "127.0.0.2"
INDEX_SIZE = 8  # the limit per key, shrunk from 64 so that the flood stays small
FLOOD = 12  # throwaway identities, more than the index holds
_attacking = contextvars.ContextVar("attacking", default=False)


@pytest.fixture
def attacker_address(monkeypatch):
    """Connections dialled under `attacking()` leave from ATTACKER_IP: another machine, as far
    as the peers it reaches can tell."""
    plain = trio.open_tcp_stream

    async def open_tcp_stream(host, port, **kwargs):
        if _attacking.get():
            kwargs["local_address"] = ATTACKER_IP
        return await plain(host, port, **kwargs)

    monkeypatch.setattr(trio, "open_tcp_stream", open_tcp_stream)
    monkeypatch.setattr(mesh.provider_policy, "MAX_PROVIDERS_PER_KEY", INDEX_SIZE)


async def flood(targets: list[Libp2pTransport], count: int) -> None:
    """`count` fresh identities, each registering itself as a provider of MODEL with every target."""
    _attacking.set(True)
    key = provider_key(MODEL)
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(count):
            sybil = await stack.enter_async_context(Libp2pTransport(listen=[f"/ip4/{ATTACKER_IP}/tcp/0"]))
            store = KadDHT(sybil.host, DHTMode.CLIENT).provider_store
            for target in targets:
                await sybil.dial(target.addrs[0], timeout=5)
                assert await store._send_add_provider(ID.from_base58(target.peer_id), key)


async def test_throwaway_providers_do_not_crowd_out_a_node_announced_after_them(attacker_address):
    clock = FakeClock()
    async with dht_peer(clock) as (a, da), dht_peer(clock, a.addrs[0]) as (honest, dh), \
            dht_peer(clock, a.addrs[0]) as (client, dc):
        key = provider_key(MODEL)
        await flood([a, honest, client], FLOOD)
        with trio.fail_after(10):  # the index on every peer is full of the attacker's identities
            while any(len(d.dht.provider_store.get_providers(key)) < INDEX_SIZE for d in (da, dh, dc)):
                await trio.sleep(0.05)
        for discovery in (da, dh, dc):
            assert set(discovery.providers.origins[key].values()) == {ATTACKER_IP}

        await dh.announce(record_of(honest, 0, 3, clock.now + 30))  # announced after the flood
        records = await wait_for_spans(dc, {honest.peer_id: (0, 3)})
        assert [r.peer_id for r in records] == [honest.peer_id]
        for discovery in (da, dc):  # the honest node holds a place in every index, within the limit
            providers = {str(p.peer_id) for p in discovery.dht.provider_store.get_providers(key)}
            assert honest.peer_id in providers and len(providers) == INDEX_SIZE
