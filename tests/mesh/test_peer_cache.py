"""The on-disk peer cache, rejoining through it without any bootstrap host, and mDNS on the LAN."""

from __future__ import annotations

import json
import socket

import pytest
import trio

from mesh.libp2p_transport import Libp2pTransport
from mesh.peer_cache import PeerCache, rejoin
from tests.mesh.conftest import LOOPBACK

pytestmark = pytest.mark.timeout(60)


class Ticker:
    """A wall clock that moves one second per reading."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


def test_cache_round_trips_through_its_file(tmp_path):
    path = tmp_path / "peers.json"
    cache = PeerCache(path, clock=Ticker())
    cache.remember("A", ["/ip4/10.0.0.1/tcp/1/p2p/A"])
    cache.remember("B", ["/ip4/10.0.0.2/tcp/1/p2p/B", "/ip4/10.0.0.2/tcp/1/p2p/not-B"])
    assert path.exists()  # news is saved at once
    reloaded = PeerCache(path, clock=Ticker())
    assert [(p.peer_id, p.addrs) for p in reloaded.peers()] == [
        ("B", ["/ip4/10.0.0.2/tcp/1/p2p/B"]), ("A", ["/ip4/10.0.0.1/tcp/1/p2p/A"])]
    assert not list(tmp_path.glob(".peers.json.tmp*"))


def test_cache_keeps_the_most_recent_peers(tmp_path):
    cache = PeerCache(tmp_path / "peers.json", clock=Ticker(), max_peers=2)
    for name in "ABC":
        cache.remember(name, [f"/ip4/10.0.0.1/tcp/1/p2p/{name}"])
    cache.remember("A", ["/ip4/10.0.0.1/tcp/1/p2p/A"])
    assert [p.peer_id for p in cache.peers()] == ["A", "C"]


@pytest.mark.parametrize("content", [b"{not json", b'{"version": 99, "peers": []}', b'{"version": 1}', b"[]"])
def test_unreadable_cache_is_empty_not_fatal(tmp_path, content):
    path = tmp_path / "peers.json"
    path.write_bytes(content)
    cache = PeerCache(path, clock=Ticker())
    assert cache.peers() == []
    cache.remember("A", ["/ip4/10.0.0.1/tcp/1/p2p/A"])
    assert json.loads(path.read_text())["peers"][0]["peer_id"] == "A"


async def test_rejoin_through_the_cache_when_every_bootstrap_host_is_gone(tmp_path):
    cache_path, identity = tmp_path / "peers.json", tmp_path / "node.key"
    async with Libp2pTransport(listen=LOOPBACK) as other:
        async with Libp2pTransport(listen=LOOPBACK) as bootstrap:
            cache = PeerCache(cache_path, clock=Ticker())
            async with Libp2pTransport(identity_path=identity, listen=LOOPBACK, peer_cache=cache) as node:
                await node.dial(bootstrap.addrs[0], timeout=5)
                await node.dial(other.addrs[0], timeout=5)
        # the bootstrap host is gone; the node restarts with only its cache
        cache = PeerCache(cache_path, clock=Ticker())
        assert {p.peer_id for p in cache.peers()} == {bootstrap.peer_id, other.peer_id}
        async with Libp2pTransport(identity_path=identity, listen=LOOPBACK, peer_cache=cache) as node:
            with trio.fail_after(10):
                reached = await rejoin(node, cache, timeout=3)
            assert reached == [other.peer_id]
            assert node.connected_peers() == [other.peer_id]


def _has_lan_interface() -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent; picks the outgoing interface
            return not probe.getsockname()[0].startswith("127.")
        except OSError:
            return False


@pytest.mark.skipif(not _has_lan_interface(), reason="mDNS needs a non-loopback interface")
async def test_mdns_finds_and_connects_lan_peers():
    wildcard = ["/ip4/0.0.0.0/tcp/0"]
    async with Libp2pTransport(listen=wildcard, enable_mdns=True) as a, \
            Libp2pTransport(listen=wildcard, enable_mdns=True) as b:
        with trio.fail_after(15):
            while b.peer_id not in a.connected_peers():
                await trio.sleep(0.1)
