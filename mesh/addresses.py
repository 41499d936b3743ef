"""Which of this host's addresses to offer a peer, and in which order to dial a peer's addresses.

Pure functions over snapshots of the host's interfaces (`local_interfaces()` reads them), so tests
drive them with made-up interfaces. The rules, learned on a LAN of distinct hosts where a node
listening on /ip4/0.0.0.0 was announced, and dialled, at the wildcard itself:

- A wildcard listen address (0.0.0.0, ::) is never offered: it becomes one address per interface
  of its family that is up, non-loopback ones first (in interface order), loopback last.
- Loopback is offered only to a peer that reached us over loopback, or when the host has nothing
  else (every process on one machine). Announcements for everyone (DHT records) leave it out.
- To a peer that reached us on one of our addresses, that address comes first.
- Dialling, a peer's addresses go: direct ones before those through a relay (`/p2p-circuit`); then
  those we were given for it (bootstrap, its record) first, then what other peers said of it; within
  each, on a subnet of one of our interfaces first, then other routable ones, loopback last;
  wildcards, multicast and malformed addresses are dropped.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import multiaddr

log = logging.getLogger(__name__)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Interface:
    """One address of this host, with the network it is on."""

    ip: IpAddress
    network: ipaddress.IPv4Network | ipaddress.IPv6Network

    @classmethod
    def parse(cls, cidr: str) -> Interface:
        iface = ipaddress.ip_interface(cidr)
        return cls(iface.ip, iface.network)


def local_interfaces() -> list[Interface]:
    """This host's IP addresses on interfaces that are up (loopback included), in the OS's order;
    IPv6 link-local addresses are left out (they need a scope to be dialled)."""
    import socket

    import psutil

    result: list[Interface] = []
    stats = psutil.net_if_stats()
    for name, addrs in psutil.net_if_addrs().items():
        if name in stats and not stats[name].isup:
            continue
        for addr in addrs:
            if addr.family not in (socket.AF_INET, socket.AF_INET6) or not addr.netmask:
                continue
            try:
                iface = ipaddress.ip_interface(f"{addr.address.split('%')[0]}/{addr.netmask}")
            except ValueError:
                continue
            if iface.ip.version == 6 and iface.ip.is_link_local:
                continue
            result.append(Interface(iface.ip, iface.network))
    return result


def ip_of(addr: multiaddr.Multiaddr) -> IpAddress | None:
    """The IP address of `/ip4/...` or `/ip6/...` multiaddrs; None for other kinds or garbage."""
    for proto in ("ip4", "ip6"):
        try:
            return ipaddress.ip_address(addr.value_for_protocol(proto))
        except Exception:  # ProtocolLookupError, ValueError
            continue
    return None


def _with_ip(addr: multiaddr.Multiaddr, ip: IpAddress) -> multiaddr.Multiaddr:
    proto = "ip4" if ip.version == 4 else "ip6"
    old = addr.value_for_protocol(proto)
    return multiaddr.Multiaddr(str(addr).replace(f"/{proto}/{old}/", f"/{proto}/{ip}/", 1))


def concrete(listen: Iterable[multiaddr.Multiaddr], interfaces: Sequence[Interface]) -> list[multiaddr.Multiaddr]:
    """The bound addresses with each wildcard replaced by the interfaces of its family: routable
    ones first, loopback last. An address that is already specific stays as it is."""
    result: list[multiaddr.Multiaddr] = []
    for addr in listen:
        ip = ip_of(addr)
        if ip is None or not ip.is_unspecified:
            candidates = [addr]
        else:
            same_family = [i.ip for i in interfaces if i.ip.version == ip.version]
            same_family.sort(key=lambda each: each.is_loopback)  # stable: keeps the OS's order otherwise
            candidates = [_with_ip(addr, each) for each in same_family]
        result.extend(c for c in candidates if c not in result)
    return result


def offered(addrs: Sequence[multiaddr.Multiaddr], reached_on: IpAddress | None = None) -> list[multiaddr.Multiaddr]:
    """What to tell a peer that reached us on `reached_on` (None: anyone, e.g. a DHT record).

    The address it reached us on first; loopback only to a loopback peer or when nothing else exists.
    """
    over_loopback = reached_on is not None and reached_on.is_loopback
    routable = [a for a in addrs if not _loopback(a)]
    chosen = list(addrs) if over_loopback or not routable else routable
    if reached_on is not None:
        chosen.sort(key=lambda a: ip_of(a) != reached_on)  # stable
    return chosen


def dial_order(addrs: Iterable[multiaddr.Multiaddr], interfaces: Sequence[Interface],
               given: Iterable[multiaddr.Multiaddr] = ()) -> list[multiaddr.Multiaddr]:
    """A peer's addresses worth dialling, best first (see the module docstring); duplicates dropped.

    Addresses in `given` (what the user or the peer's own record said) come before the rest (what
    other peers said of it, which any of them can make up), so a hostile DHT peer cannot push them
    past a dialler's cap with invented ones."""
    trusted = {_without_peer(a) for a in given}
    ranked: list[tuple[bool, bool, int, int, multiaddr.Multiaddr]] = []
    seen: set[str] = set()
    for index, addr in enumerate([*given, *addrs]):
        ip, key = ip_of(addr), _without_peer(addr)
        if ip is None or key in seen:
            continue
        seen.add(key)
        if ip.is_unspecified or ip.is_multicast or (ip.version == 6 and ip.is_link_local):
            log.debug("not dialling %s: not an address of a host", addr)
            continue
        if ip.is_loopback:
            rank = 2
        elif any(ip in i.network for i in interfaces if i.ip.version == ip.version and not i.ip.is_loopback):
            rank = 0
        else:
            rank = 1
        ranked.append(("/p2p-circuit" in key, key not in trusted, rank, index, addr))
    return [addr for *_, addr in sorted(ranked, key=lambda r: r[:4])]


def _without_peer(addr: multiaddr.Multiaddr) -> str:
    """The address less the peer id it ends in (a relayed address keeps its relay's id)."""
    text = str(addr)
    head, _, last = text.rpartition("/p2p/")
    return head if head and "/" not in last else text


def _loopback(addr: multiaddr.Multiaddr) -> bool:
    ip = ip_of(addr)
    return ip is not None and ip.is_loopback
