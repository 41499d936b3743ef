"""A LAN of distinct hosts on this machine: Linux network namespaces joined by bridges; and, on it,
households behind NAT routers.

Each host is a network namespace with its own interfaces, addresses, routes and HOME; each LAN is a
bridge inside a namespace of its own (the "switch"), so nothing is added to the machine's own
network and deleting the namespaces removes every interface. A host joins one LAN or several (a
laptop on two networks); its first LAN is its default route, the way a household machine reaches
everything through its router, so an address on a LAN it is not on fails the way it does at home
(no answer to ARP, "No route to host" after a few seconds), not at once.

    with NetBed(hosts=4) as bed:                       # 10.77.0.1-4 on one LAN
        proc = bed.popen(bed.hosts[0], ["hearth", "node", ...])   # runs inside host 1
    # every process still running in a host is killed, every namespace deleted

With `homes`, LAN 0 (10.77.0.0/24) stands for the internet and each home is a LAN of its own
behind a router: a namespace with a WAN leg on the internet at 10.77.0.(100+j) and a LAN leg at
10.(100+j).0.1 for home j (1-based), whose hosts are 10.(100+j).0.2, .3, ... with the router as
their default gateway. The router forwards, masquerades the home's subnet behind its WAN address
and drops every connection the WAN side starts (only established and related packets come in, to
the home or to the router itself; dropped, not refused, as household routers do), all in nftables
(`nat_ruleset`). What the internet sees of a home host is `host.public_addr`, its router's address.

    with NetBed(hosts=1, homes=[Home(nat="cone"), Home(2, nat="symmetric")]) as bed:
        server, alice, bob, carol = bed.hosts          # 10.77.0.1; 10.101.0.2; 10.102.0.2, .3
        alice.router.public                            # 10.77.0.101: where alice's connections come from

The two kinds of NAT, in RFC 4787's terms and the classic names:
  "cone"       plain `masquerade`: the source port is kept when no other connection through the
               router holds it, so one local port maps to the same public port whatever the
               destination (endpoint-independent mapping, in practice, not by promise: a clash
               picks another port); but only packets of a connection the home started come back
               (address- and port-dependent filtering, conntrack's): a "port-restricted cone".
  "symmetric"  `masquerade fully-random`: every connection gets a random public port, so the
               mapping depends on the destination and cannot be predicted (address- and
               port-dependent mapping): a "symmetric" NAT.
TCP hole punching through them (tests/integration/test_netbed_nat.py): A, listening on port p,
also connects from p (SO_REUSEPORT) to B's public address and port q. B's router drops that SYN,
silently (a reset would close the hole), and A's router now expects an answer from exactly there.
B then connects from q to A's public address and port p. Through two cone NATs both ports are
kept, A's router lets B's SYN in as that answer, and the connection is made by TCP simultaneous
open on A's connecting socket, which must stay open: if A closes it and leaves the answer to its
listener, the listener's SYN-ACK does not follow the sequence numbers of A's SYN, and conntrack
drops it as invalid. Where either side is symmetric, the port to aim at or to let in is a random
one nobody knows, the SYN is dropped and the connect times out: such peers need a relay. (The same
reasoning holds for UDP; only TCP is tested.)

    python tools/netbed.py up --hosts 4 [--home cone --home symmetric:2]   # by hand
    ip netns exec hearth-XXXX-h1 .venv/bin/hearth node ...
    python tools/netbed.py down                        # removes every test bed

Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) and `ip` from iproute2, and for homes `nft` from
nftables; `NetBed.unavailable(nat=...)` says why not where they are missing. Names carry the
creating process id, so `up` removes test beds left behind by processes that died without tearing
down.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "hearth-"
NAT_TYPES = ("cone", "symmetric")
TIMEOUT = 30  # seconds, for every command that sets up or removes part of a test bed
_counter = itertools.count()


class NetBedError(RuntimeError):
    """A namespace, interface, address or ruleset could not be set up; carries the failing command."""


@dataclass(frozen=True)
class Home:
    """A household for `NetBed(homes=...)`: `hosts` machines on a LAN of their own behind a router
    whose NAT is `nat` ("cone" or "symmetric", see the module's docstring)."""

    hosts: int = 1
    nat: str = "cone"

    def __post_init__(self):
        if self.hosts < 1:
            raise ValueError(f"a home needs at least one host, got {self.hosts}")
        if self.nat not in NAT_TYPES:
            raise ValueError(f"nat must be one of {NAT_TYPES}, got {self.nat!r}")


@dataclass
class Router:
    name: str  # the network namespace
    public: str  # its WAN address on the internet (LAN 0): what the internet sees its home's hosts as
    gateway: str  # its address on the home's LAN
    nat: str  # "cone" or "symmetric"
    hosts: list[Host] = field(default_factory=list, repr=False, compare=False)  # the home's hosts


@dataclass
class Host:
    name: str  # the network namespace
    addrs: list[str]  # one IPv4 address per LAN it is on, in LAN order
    home: Path  # its own HOME (identity keys, peer caches, ~/.cache)
    router: Router | None = None  # the NAT router it is behind; None for a host on the (internet) LAN

    @property
    def addr(self) -> str:
        return self.addrs[0]

    @property
    def behind_nat(self) -> bool:
        return self.router is not None

    @property
    def public_addr(self) -> str:
        """The address hosts on the internet see this host's connections come from."""
        return self.router.public if self.router else self.addr

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["HOME"] = str(self.home)
        return env

    def command(self, argv: list[str]) -> list[str]:
        """`argv` as run inside this host (`ip netns exec` execs it: the process id is argv's own)."""
        return ["ip", "netns", "exec", self.name, *argv]


@dataclass
class Lan:
    index: int
    subnet: str  # the first three octets, e.g. "10.77.0"
    members: list[int] = field(default_factory=list)  # host indices


def nat_ruleset(nat: str, subnet: str) -> str:
    """The nftables ruleset of a home router: `subnet` (e.g. "10.101.0.0/24") masqueraded out of
    interface "wan", keeping ports ("cone") or with a random port per connection ("symmetric");
    from "wan", only packets of connections already under way come in, to the home or the router;
    packets conntrack finds invalid are not forwarded (none leaves with a private address)."""
    masquerade = "masquerade fully-random" if nat == "symmetric" else "masquerade"
    return f"""table ip hearth_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" ip saddr {subnet} {masquerade}
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        ct state invalid drop
        iifname "wan" ct state established,related accept
        iifname "wan" drop
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" drop
    }}
}}
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=TIMEOUT)
    if check and result.returncode != 0:
        raise NetBedError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result


def _nft(namespace: str, ruleset: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", namespace, "nft", "-f", "-"], input=ruleset,
                          capture_output=True, text=True, timeout=TIMEOUT)


def _sysctl(namespace: str, *settings: str, check: bool = True) -> None:
    result = subprocess.run(["ip", "netns", "exec", namespace, "sysctl", "-q", "-w", *settings],
                            capture_output=True, text=True, timeout=TIMEOUT)
    if check and result.returncode != 0:
        raise NetBedError(f"sysctl {' '.join(settings)} in {namespace}: {result.stderr.strip()}")


def _netns_list() -> list[str]:
    result = _ip("netns", "list", check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NetBed:
    """`hosts` hosts; `lans[i]` lists the LANs (0-based) host i is on, default: everyone on LAN 0.
    Host i's address on LAN k is 10.77+k.0.(i+1).

    `homes`: households behind NAT routers on LAN 0, the internet (see the module's docstring);
    their hosts follow the `hosts` ones in `self.hosts`, home by home, and each router, in
    `self.routers`, lists its home's hosts. `self.lans` are the LANs of the `hosts` ones.
    """

    def __init__(self, hosts: int, *, lans: list[list[int]] | None = None, homes: Sequence[Home] = (),
                 tag: str | None = None, join_here: bool = False):
        if hosts < 0 or hosts + sum(home.hosts for home in homes) < 1:
            raise ValueError(f"a test bed needs at least one host, got {hosts} and {len(homes)} homes")
        self.tag = tag or f"{os.getpid()}x{next(_counter)}"
        membership = lans or [[0] for _ in range(hosts)]
        if len(membership) != hosts or any(not m for m in membership):
            raise ValueError("lans must give at least one LAN for each host")
        n_lans = max((max(m) for m in membership), default=0) + 1
        if homes and (hosts > 100 or len(homes) > 153 or n_lans > 24):  # routers at .101-.253 of LAN 0
            raise ValueError("with homes, at most 100 hosts, 153 homes and 24 LANs: their addresses would collide")
        self.lans = [Lan(k, f"10.{77 + k}.0") for k in range(n_lans)]
        self._membership = membership
        self._homes = list(homes)
        self.hosts: list[Host] = []
        self.routers: list[Router] = []
        self._processes: list[subprocess.Popen] = []
        self._namespaces: list[str] = []
        self.join_here = join_here  # this machine's own network joins LAN 0 as a host too (.254)
        self.here_addr: str | None = None
        self._here_link = _here_link(self.tag)
        self._root: Path | None = None

    @staticmethod
    def unavailable(nat: bool = False) -> str | None:
        """Why namespaces (with `nat`, also home routers' NAT in nftables) cannot be made here, or
        None when they can."""
        if shutil.which("ip") is None:
            return "the `ip` command (iproute2) is not installed"
        if os.geteuid() != 0:
            return "network namespaces need root"
        if nat and shutil.which("nft") is None:
            return "the `nft` command (nftables) is not installed"
        probe = f"{PREFIX}probe-{os.getpid()}"
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"`ip netns add` failed: {made.stderr.strip()}"
        try:
            ruled = _nft(probe, nat_ruleset("symmetric", "10.100.0.0/24")) if nat else None
        finally:
            _ip("netns", "del", probe, check=False)
        if ruled is not None and ruled.returncode != 0:
            return f"nftables NAT in a network namespace failed: {ruled.stderr.strip()}"
        return None

    def _ns(self, suffix: str) -> str:
        return f"{PREFIX}{self.tag}-{suffix}"

    def up(self) -> NetBed:
        remove_stale()
        self._root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{self.tag}-"))
        try:
            for lan in self.lans:
                self._add_switch(f"s{lan.index}")
            for i, lan_ids in enumerate(self._membership):
                for k in lan_ids:
                    self.lans[k].members.append(i)
                host = self._add_host([f"{self.lans[k].subnet}.{i + 1}" for k in lan_ids], [f"s{k}" for k in lan_ids])
                _ip("-n", host.name, "route", "add", "default", "dev", "eth0")
            for j, home in enumerate(self._homes, start=1):
                self._add_home(j, home)
            if self.join_here:
                self._join_here()
        except BaseException:
            self.down()
            raise
        return self

    def _add_switch(self, suffix: str) -> str:
        switch = self._add_namespace(suffix)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        return switch

    def _plug(self, namespace: str, inner: str, switch_suffix: str, outer: str, addr: str) -> None:
        """A veth from the bridge of switch `switch_suffix` (end `outer`) into `namespace` (end
        `inner`, with `addr`/24), both ends up."""
        switch = self._ns(switch_suffix)
        _ip("link", "add", outer, "netns", switch, "type", "veth", "peer", "name", inner, "netns", namespace)
        _ip("-n", switch, "link", "set", outer, "master", "br0")
        _ip("-n", switch, "link", "set", outer, "up")
        _ip("-n", namespace, "addr", "add", f"{addr}/24", "dev", inner)
        _ip("-n", namespace, "link", "set", inner, "up")

    def _add_host(self, addrs: list[str], switches: list[str], router: Router | None = None) -> Host:
        """Host h<n> (n: one more than the hosts so far) on the LANs of `switches` at `addrs`,
        interfaces eth0, eth1, ...; without a default route."""
        n = len(self.hosts) + 1
        name = self._add_namespace(f"h{n}")
        _sysctl(name, "net.ipv6.conf.all.disable_ipv6=1", check=False)
        _ip("-n", name, "link", "set", "lo", "up")
        for port, (addr, switch) in enumerate(zip(addrs, switches)):
            self._plug(name, f"eth{port}", switch, f"h{n}e{port}", addr)
        home = self._root / f"h{n}"
        home.mkdir()
        host = Host(name, addrs, home, router)
        self.hosts.append(host)
        return host

    def _add_home(self, j: int, home: Home) -> None:
        """Home j (1-based): its LAN's switch home<j>, router r<j> between that LAN and LAN 0, hosts."""
        subnet, switch = f"10.{100 + j}.0", f"home{j}"
        self._add_switch(switch)
        router = Router(self._add_namespace(f"r{j}"), f"{self.lans[0].subnet}.{100 + j}", f"{subnet}.1", home.nat)
        _sysctl(router.name, "net.ipv6.conf.all.disable_ipv6=1", check=False)
        _sysctl(router.name, "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.arp_ignore=1")  # on the WAN, ARP answered for the WAN address only
        _ip("-n", router.name, "link", "set", "lo", "up")
        self._plug(router.name, "wan", "s0", f"r{j}w", router.public)
        self._plug(router.name, "lan", switch, f"r{j}l", router.gateway)
        _ip("-n", router.name, "route", "add", "default", "dev", "wan")
        ruled = _nft(router.name, nat_ruleset(home.nat, f"{subnet}.0/24"))
        if ruled.returncode != 0:
            raise NetBedError(f"nft -f in {router.name}: {ruled.stderr.strip()}")
        self.routers.append(router)
        for n in range(home.hosts):
            host = self._add_host([f"{subnet}.{n + 2}"], [switch], router)
            _ip("-n", host.name, "route", "add", "default", "via", router.gateway)
            router.hosts.append(host)

    def _join_here(self) -> None:
        """A veth from this machine's own network namespace to LAN 0's bridge, at .254: processes
        here (a benchmark's client) reach the hosts directly, like one more machine on the LAN."""
        switch = self._ns("s0")
        _ip("link", "add", self._here_link, "type", "veth", "peer", "name", "here", "netns", switch)
        _ip("-n", switch, "link", "set", "here", "master", "br0")
        _ip("-n", switch, "link", "set", "here", "up")
        self.here_addr = f"{self.lans[0].subnet}.254"
        _ip("addr", "add", f"{self.here_addr}/24", "dev", self._here_link)
        _ip("link", "set", self._here_link, "up")

    def _add_namespace(self, suffix: str) -> str:
        name = self._ns(suffix)
        _ip("netns", "add", name)
        self._namespaces.append(name)
        return name

    def popen(self, host: Host, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start `argv` inside `host` with its HOME; killed at `down()` if still running."""
        kwargs.setdefault("env", host.env())
        process = subprocess.Popen(host.command(argv), **kwargs)
        self._processes.append(process)
        return process

    def run(self, host: Host, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", host.env())
        kwargs.setdefault("timeout", 120)
        return subprocess.run(host.command(argv), **kwargs)

    def down(self) -> None:
        """Kill every process in the test bed's namespaces, delete them (and so every interface)."""
        for process in self._processes:
            if process.poll() is None:
                process.kill()
        for process in self._processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self.here_addr is not None:
            _ip("link", "del", self._here_link, check=False)  # also goes with LAN 0's namespace
            self.here_addr = None
        for name in reversed(self._namespaces):
            _kill_namespace(name)
        self._namespaces.clear()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def __enter__(self) -> NetBed:
        return self.up()

    def __exit__(self, *exc_info) -> None:
        self.down()


def _kill_namespace(name: str) -> None:
    """SIGKILL whatever still runs in namespace `name` (by process id), then delete it."""
    for _ in range(50):
        pids = [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    _ip("netns", "del", name, check=False)


def _here_link(tag: str) -> str:
    """The name, here, of the link from this machine's network to LAN 0 of test bed `tag`."""
    return f"hb{tag}"[:15]


def remove_stale(*, everything: bool = False) -> list[str]:
    """Delete test-bed namespaces whose creating process is gone (all of them with `everything`)."""
    removed = []
    for name in _netns_list():
        if not name.startswith(PREFIX) or name.startswith(f"{PREFIX}probe-"):
            continue
        owner = name[len(PREFIX):].split("x", 1)[0]
        if everything or (owner.isdigit() and not _pid_alive(int(owner))):
            _kill_namespace(name)
            removed.append(name)
    for tag in {name[len(PREFIX):].rsplit("-", 1)[0] for name in removed}:  # and HOMEs, link here
        _ip("link", "del", _here_link(tag), check=False)  # else gone only once the kernel frees LAN 0's namespace
        for home in Path(tempfile.gettempdir()).glob(f"{PREFIX}{tag}-*"):
            shutil.rmtree(home, ignore_errors=True)
    return removed


def parse_home(text: str) -> Home:
    """A `Home` from the command line's "NAT" or "NAT:HOSTS", e.g. "symmetric:2"."""
    nat, _, hosts = text.partition(":")
    try:
        return Home(int(hosts or 1), nat)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netbed", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build a test bed and leave it up (until `down`)")
    up.add_argument("--hosts", type=int, default=4, help="hosts on LAN 0 (the internet, with homes)")
    up.add_argument("--home", type=parse_home, action="append", default=[], metavar="NAT[:HOSTS]",
                    help="a home behind a router, NAT cone or symmetric, with HOSTS hosts (1); repeatable")
    sub.add_parser("down", help="remove every test bed on this machine")
    args = parser.parse_args(argv)
    if args.command == "down":
        removed = remove_stale(everything=True)
        print(f"removed {len(removed)} namespaces")
        return 0
    reason = NetBed.unavailable(nat=bool(args.home))
    if reason:
        print(f"netbed: {reason}", file=sys.stderr)
        return 2
    bed = NetBed(args.hosts, homes=args.home, tag=f"cli{os.getpid()}").up()  # not a process id: kept until `down`
    for router in bed.routers:
        print(f"{router.name}  {router.public}  {router.nat} NAT, gateway {router.gateway}")
    for host in bed.hosts:
        behind = f"  behind {host.router.public}" if host.router else ""
        print(f"{host.name}  {' '.join(host.addrs)}{behind}  HOME={host.home}")
    print(f"run a command on a host: ip netns exec {bed.hosts[0].name} env HOME={bed.hosts[0].home} <command>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
