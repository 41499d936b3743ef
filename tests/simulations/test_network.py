"""The virtual network's link model, partitions and clogs, in trio's virtual time."""

from __future__ import annotations

import random

import pytest
import trio

from mesh.memory_transport import LOOPBACK, MemoryTransport, memory_addr
from simulations.network import MIN_RETRANSMIT_S, PUBLIC, VirtualNetwork
from simulations.scenario import DeviceProfile, NetworkSpec

HOME = DeviceProfile("home", uplink_mbps=8.0, downlink_mbps=80.0, access_ms=5.0)
SPEC = NetworkSpec(intra_rtt_s=0.02, inter_rtt_s=0.2, rtt={"na-eu": "90ms"}, jitter_s=0.0)


def network(spec: NetworkSpec = SPEC, scale: float = 1.0) -> VirtualNetwork:
    net = VirtualNetwork(spec, random.Random(0), bandwidth_scale=scale)
    for peer, region in (("a", "na"), ("b", "na"), ("c", "eu"), ("d", "asia")):
        net.place(peer, region, HOME)
    return net


def test_latency_is_half_the_region_round_trip_plus_last_miles():
    net = network()
    assert net.link("a", "b").latency_s == pytest.approx(0.01 + 0.01)
    assert net.link("a", "c").latency_s == pytest.approx(0.045 + 0.01)
    assert net.link("c", "d").latency_s == pytest.approx(0.1 + 0.01)


def test_bandwidth_is_asymmetric_and_scaled():
    net = network(scale=0.25)
    assert net.link("a", "b").bandwidth_bps == pytest.approx(8e6 * 0.25)  # a's uplink
    net.place("dc", "na", DeviceProfile("dc", uplink_mbps=1000.0, downlink_mbps=1000.0, access_ms=0.0))
    assert net.link("dc", "a").bandwidth_bps == pytest.approx(80e6 * 0.25)  # a's downlink


def test_loss_costs_a_retransmission():
    net = network(NetworkSpec(loss=1.0, jitter_s=0.0))
    assert net.link("a", "b").latency_s >= MIN_RETRANSMIT_S and net.losses == 1


def test_partitions_cut_regions_apart_and_heal():
    net = network()
    pairs = net.partition(["eu"], ["na", "eu", "asia"])
    assert net.is_cut("a", "c") and net.is_cut("c", "d") and not net.is_cut("a", "d") and not net.is_cut("a", "b")
    net.heal(pairs)
    assert not net.is_cut("a", "c")


def test_a_clogged_host_reaches_nobody():
    net = network()
    net.clog("b")
    assert net.is_cut("a", "b") and net.is_cut("b", "d") and not net.is_cut("a", "d")
    net.unclog("b")
    assert not net.is_cut("a", "b")


async def test_a_megabyte_over_a_home_uplink_takes_a_second(autojump_clock):
    net = network()
    received = trio.Event()

    async def sink(stream):
        total = 0
        while total < 1_000_000:
            total += len(await stream.receive_some(1 << 20))
        received.set()

    async with MemoryTransport.open(net, "a") as a, MemoryTransport.open(net, "b") as b:
        b.set_handler("/sink", sink)
        a.add_peer_addrs("b", b.addrs)
        stream = await a.open_stream("b", "/sink", timeout=5)
        started = trio.current_time()
        await stream.send_all(b"x" * 1_000_000)
        await received.wait()
        assert trio.current_time() - started == pytest.approx(1.0 + 0.02, rel=0.01)  # 8 Mbit/s + one way


async def test_hosts_and_users_are_reached_through_their_public_address_only(autojump_clock):
    net = network()
    async with MemoryTransport.open(net, "a") as a, MemoryTransport.open(net, "c") as c:
        assert c.addrs == [memory_addr(PUBLIC, "c", "c"), memory_addr(LOOPBACK, "c", "c")]
        public, loopback = c.addrs
        assert net.why_unreachable("a", public) is None  # across regions: the internet is one segment
        assert "own host" in net.why_unreachable("a", loopback)
        assert await a.dial(public, timeout=5) == "c"
