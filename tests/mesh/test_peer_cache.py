"""The on-disk peer cache, rejoining through it without any bootstrap host, and mDNS on the LAN."""

from __future__ import annotations

import json
import socket

import pytest
import trio

from mesh.errors import DialError
from mesh.libp2p_transport import Libp2pTransport
from mesh.peer_cache import FORMAT_VERSION, PeerCache, rejoin
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


def test_peers_that_served_are_kept_over_newcomers_and_rank_first(tmp_path):
    cache = PeerCache(tmp_path / "peers.json", clock=Ticker(), max_peers=3)
    for name in "ABC":
        cache.remember(name, [f"/ip4/10.0.0.1/tcp/1/p2p/{name}"])
    cache.credit("A")
    cache.credit("B")
    cache.credit("A")  # A served last
    for name in "DEF":  # newer, never served: each pushes out the oldest of the unserved, never A or B
        cache.remember(name, [f"/ip4/10.0.0.1/tcp/1/p2p/{name}"])
    assert [p.peer_id for p in cache.peers()] == ["A", "B", "F"]
    assert [p.served for p in cache.peers()] == [2, 1, 0]


def test_a_peer_that_keeps_failing_ranks_below_one_that_does_not(tmp_path):
    cache = PeerCache(tmp_path / "peers.json", clock=Ticker(), max_peers=3)
    for name in "ABC":
        cache.remember(name, [f"/ip4/10.0.0.1/tcp/1/p2p/{name}"])
    cache.credit("A")
    cache.credit("B")
    cache.fault("B")  # still trusted, below A although it served later
    cache.fault("C")
    assert [p.peer_id for p in cache.peers()] == ["A", "B", "C"]
    cache.fault("B")
    cache.fault("B")  # three in a row: its service no longer counts
    assert [p.peer_id for p in cache.peers()] == ["A", "C", "B"]
    cache.remember("D", ["/ip4/10.0.0.1/tcp/1/p2p/D"])  # the most failed goes first
    assert [p.peer_id for p in cache.peers()] == ["A", "D", "C"]
    cache.remember("C", ["/ip4/10.0.0.1/tcp/1/p2p/C"])  # answering a dial clears its failures
    assert [p.peer_id for p in cache.peers()] == ["A", "C", "D"]


def test_credit_adds_a_peer_not_cached_and_ignores_one_without_its_address(tmp_path):
    cache = PeerCache(tmp_path / "peers.json", clock=Ticker(), max_peers=1)
    cache.remember("A", ["/ip4/10.0.0.1/tcp/1/p2p/A"])
    cache.credit("B", ["/ip4/10.0.0.2/tcp/1/p2p/B"])  # served over a connection it opened
    cache.credit("C")
    cache.fault("D")
    assert [(p.peer_id, p.served) for p in cache.peers()] == [("B", 1)]


def test_service_persists_and_only_news_is_written_at_once(tmp_path):
    path = tmp_path / "peers.json"
    cache = PeerCache(path, clock=Ticker())
    cache.remember("A", ["/ip4/10.0.0.1/tcp/1/p2p/A"])
    cache.remember("B", ["/ip4/10.0.0.2/tcp/1/p2p/B"])
    cache.credit("A")  # news: A is now trusted
    assert [p.peer_id for p in PeerCache(path, clock=Ticker()).peers()] == ["A", "B"]
    written = path.read_bytes()
    for _ in range(5):
        cache.credit("A")  # a count, not news: written on the next save
    cache.fault("B")
    cache.remember("B", ["/ip4/10.0.0.2/tcp/1/p2p/B"])  # reached again at a known address
    assert path.read_bytes() == written
    cache.save()
    reloaded = PeerCache(path, clock=Ticker())
    assert [(p.peer_id, p.served, p.failures) for p in reloaded.peers()] == [("A", 6, 0), ("B", 0, 0)]
    assert json.loads(path.read_text())["version"] == FORMAT_VERSION


def test_a_version_1_file_loads_as_peers_that_never_served(tmp_path):
    path = tmp_path / "peers.json"
    path.write_text(json.dumps({"version": 1, "peers": [
        {"peer_id": "A", "addrs": ["/ip4/10.0.0.1/tcp/1/p2p/A"], "last_seen": 5.0},
        {"peer_id": "B", "addrs": ["/ip4/10.0.0.2/tcp/1/p2p/B"], "last_seen": 7.0}]}))
    cache = PeerCache(path, clock=Ticker())
    assert [(p.peer_id, p.served, p.failures) for p in cache.peers()] == [("B", 0, 0), ("A", 0, 0)]
    cache.credit("A")
    reloaded = PeerCache(path, clock=Ticker())  # written back in the current format
    assert [(p.peer_id, p.served) for p in reloaded.peers()] == [("A", 1), ("B", 0)]
    assert json.loads(path.read_text())["version"] == FORMAT_VERSION


@pytest.mark.parametrize("content", [b"{not json", b'{"version": 99, "peers": []}', b'{"version": 1}', b"[]",
                                     b'{"version": 2, "peers": [{"peer_id": "A", "addrs": [], "last_seen": 1, '
                                     b'"served": "many"}]}'])
def test_unreadable_cache_is_empty_not_fatal(tmp_path, content):
    path = tmp_path / "peers.json"
    path.write_bytes(content)
    cache = PeerCache(path, clock=Ticker())
    assert cache.peers() == []
    cache.remember("A", ["/ip4/10.0.0.1/tcp/1/p2p/A"])
    assert json.loads(path.read_text())["peers"][0]["peer_id"] == "A"


async def test_the_libp2p_transport_reports_service_and_failed_dials_to_its_cache(tmp_path):
    path = tmp_path / "peers.json"
    cache = PeerCache(path, clock=Ticker())
    async with Libp2pTransport(listen=LOOPBACK) as inbound:
        async with Libp2pTransport(listen=LOOPBACK) as server:
            address = server.addrs[0]
            async with Libp2pTransport(listen=LOOPBACK, peer_cache=cache) as node:
                await node.dial(address, timeout=5)
                await inbound.dial(node.addrs[0], timeout=5)  # it connected to us: cached once it serves,
                node.add_peer_addrs(inbound.peer_id, inbound.addrs)  # where discovery says it is
                node.report_service(server.peer_id, ok=True)
                node.report_service(inbound.peer_id, ok=True)
                node.report_service(server.peer_id, ok=False)
        async with Libp2pTransport(listen=LOOPBACK, peer_cache=cache) as node:  # the server is gone
            with pytest.raises(DialError):
                await node.dial(address, timeout=3)
    served = {p.peer_id: (p.served, p.failures) for p in PeerCache(path, clock=Ticker()).peers()}
    assert served == {server.peer_id: (1, 2), inbound.peer_id: (1, 0)}


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
