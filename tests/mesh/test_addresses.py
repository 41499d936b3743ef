"""Which addresses a host offers and in which order it dials (mesh.addresses), on made-up interfaces."""

from __future__ import annotations

import ipaddress

from multiaddr import Multiaddr

from mesh.addresses import Interface, concrete, dial_order, local_interfaces, offered

LAPTOP = [Interface.parse("127.0.0.1/8"), Interface.parse("10.77.0.2/24"), Interface.parse("192.168.5.9/24")]


def addrs(*texts: str) -> list[Multiaddr]:
    return [Multiaddr(t) for t in texts]


def texts(values) -> list[str]:
    return [str(v) for v in values]


def test_a_wildcard_becomes_every_interface_routable_first_and_never_stays_a_wildcard():
    result = concrete(addrs("/ip4/0.0.0.0/tcp/4001"), LAPTOP)
    assert texts(result) == ["/ip4/10.77.0.2/tcp/4001", "/ip4/192.168.5.9/tcp/4001", "/ip4/127.0.0.1/tcp/4001"]


def test_a_specific_listen_address_stays_as_it_is_and_duplicates_go():
    result = concrete(addrs("/ip4/10.77.0.2/tcp/4001", "/ip4/0.0.0.0/tcp/4001"), LAPTOP)
    assert texts(result) == ["/ip4/10.77.0.2/tcp/4001", "/ip4/192.168.5.9/tcp/4001", "/ip4/127.0.0.1/tcp/4001"]


def test_an_ipv6_wildcard_takes_only_ipv6_interfaces():
    interfaces = LAPTOP + [Interface.parse("::1/128"), Interface.parse("fd00::7/64")]
    assert texts(concrete(addrs("/ip6/::/tcp/1"), interfaces)) == ["/ip6/fd00::7/tcp/1", "/ip6/::1/tcp/1"]


def test_everyone_gets_the_routable_addresses_and_loopback_only_when_nothing_else_exists():
    mixed = addrs("/ip4/10.77.0.2/tcp/1", "/ip4/127.0.0.1/tcp/1")
    assert texts(offered(mixed)) == ["/ip4/10.77.0.2/tcp/1"]
    assert texts(offered(addrs("/ip4/127.0.0.1/tcp/1"))) == ["/ip4/127.0.0.1/tcp/1"]


def test_a_peer_gets_the_address_it_reached_us_on_first_and_loopback_only_over_loopback():
    mine = addrs("/ip4/10.77.0.2/tcp/1", "/ip4/192.168.5.9/tcp/1", "/ip4/127.0.0.1/tcp/1")
    second_lan = offered(mine, ipaddress.ip_address("192.168.5.9"))
    assert texts(second_lan) == ["/ip4/192.168.5.9/tcp/1", "/ip4/10.77.0.2/tcp/1"]
    local = offered(mine, ipaddress.ip_address("127.0.0.1"))
    assert texts(local) == ["/ip4/127.0.0.1/tcp/1", "/ip4/10.77.0.2/tcp/1", "/ip4/192.168.5.9/tcp/1"]


def test_dialling_tries_our_own_subnets_first_then_routable_then_loopback_and_drops_what_no_host_has():
    known = addrs("/ip4/0.0.0.0/tcp/1", "/ip4/127.0.0.1/tcp/1", "/ip4/172.16.0.4/tcp/1", "/ip4/224.0.0.251/tcp/1",
                  "/ip4/192.168.5.20/tcp/1", "/ip4/10.77.0.3/tcp/1", "/ip6/::/tcp/1", "/dns4/example.org/tcp/1",
                  "/ip4/10.77.0.3/tcp/1")
    assert texts(dial_order(known, LAPTOP)) == [
        "/ip4/192.168.5.20/tcp/1", "/ip4/10.77.0.3/tcp/1", "/ip4/172.16.0.4/tcp/1", "/ip4/127.0.0.1/tcp/1"]


def test_dialling_with_only_a_wildcard_known_gives_nothing_to_dial():
    assert dial_order(addrs("/ip4/0.0.0.0/tcp/4001"), LAPTOP) == []


def test_this_machine_has_loopback_among_its_interfaces():
    found = local_interfaces()
    assert any(i.ip == ipaddress.ip_address("127.0.0.1") for i in found)
    assert all(i.ip in i.network for i in found)
