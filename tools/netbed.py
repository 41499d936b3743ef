"""A LAN of distinct hosts on this machine: Linux network namespaces joined by bridges.

Each host is a network namespace with its own interfaces, addresses, routes and HOME; each LAN is a
bridge inside a namespace of its own (the "switch"), so nothing is added to the machine's own
network and deleting the namespaces removes every interface. A host joins one LAN or several (a
laptop on two networks); its first LAN is its default route, the way a household machine reaches
everything through its router, so an address on a LAN it is not on fails the way it does at home
(no answer to ARP, "No route to host" after a few seconds), not at once.

    with NetBed(hosts=4) as bed:                       # 10.77.0.1-4 on one LAN
        proc = bed.popen(bed.hosts[0], ["hearth", "node", ...])   # runs inside host 1
    # every process still running in a host is killed, every namespace deleted

    python tools/netbed.py up --hosts 4                # for typing commands by hand:
    ip netns exec hearth-XXXX-h1 .venv/bin/hearth node ...
    python tools/netbed.py down                        # removes every test bed

Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) and `ip` from iproute2; `NetBed.unavailable()`
says why not where they are missing. Names carry the creating process id, so `up` removes test
beds left behind by processes that died without tearing down.
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
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "hearth-"
_counter = itertools.count()


class NetBedError(RuntimeError):
    """A namespace, interface or address could not be set up; carries the failing command."""


@dataclass
class Host:
    name: str  # the network namespace
    addrs: list[str]  # one IPv4 address per LAN it is on, in LAN order
    home: Path  # its own HOME (identity keys, peer caches, ~/.cache)

    @property
    def addr(self) -> str:
        return self.addrs[0]

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


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise NetBedError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result


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
    """

    def __init__(self, hosts: int, *, lans: list[list[int]] | None = None, tag: str | None = None,
                 join_here: bool = False):
        if hosts < 1:
            raise ValueError(f"a test bed needs at least one host, got {hosts}")
        self.tag = tag or f"{os.getpid()}x{next(_counter)}"
        membership = lans or [[0] for _ in range(hosts)]
        if len(membership) != hosts or any(not m for m in membership):
            raise ValueError("lans must give at least one LAN for each host")
        n_lans = max(max(m) for m in membership) + 1
        self.lans = [Lan(k, f"10.{77 + k}.0") for k in range(n_lans)]
        self._membership = membership
        self.hosts: list[Host] = []
        self._processes: list[subprocess.Popen] = []
        self._namespaces: list[str] = []
        self.join_here = join_here  # this machine's own network joins LAN 0 as a host too (.254)
        self.here_addr: str | None = None
        self._here_link = f"hb{self.tag}"[:15]
        self._root: Path | None = None

    @staticmethod
    def unavailable() -> str | None:
        """Why namespaces cannot be made here, or None when they can."""
        if shutil.which("ip") is None:
            return "the `ip` command (iproute2) is not installed"
        if os.geteuid() != 0:
            return "network namespaces need root"
        probe = f"{PREFIX}probe-{os.getpid()}"
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"`ip netns add` failed: {made.stderr.strip()}"
        _ip("netns", "del", probe, check=False)
        return None

    def _ns(self, suffix: str) -> str:
        return f"{PREFIX}{self.tag}-{suffix}"

    def up(self) -> NetBed:
        remove_stale()
        self._root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{self.tag}-"))
        try:
            for lan in self.lans:
                switch = self._add_namespace(f"s{lan.index}")
                _ip("-n", switch, "link", "add", "br0", "type", "bridge")
                _ip("-n", switch, "link", "set", "br0", "up")
            for i, lan_ids in enumerate(self._membership):
                name = self._add_namespace(f"h{i + 1}")
                self._sysctl(name, "net.ipv6.conf.all.disable_ipv6=1")
                _ip("-n", name, "link", "set", "lo", "up")
                addrs = []
                for port, k in enumerate(lan_ids):
                    lan = self.lans[k]
                    switch, inner, outer = self._ns(f"s{k}"), f"eth{port}", f"h{i + 1}e{port}"
                    _ip("link", "add", outer, "netns", switch, "type", "veth", "peer", "name", inner, "netns", name)
                    _ip("-n", switch, "link", "set", outer, "master", "br0")
                    _ip("-n", switch, "link", "set", outer, "up")
                    addr = f"{lan.subnet}.{i + 1}"
                    _ip("-n", name, "addr", "add", f"{addr}/24", "dev", inner)
                    _ip("-n", name, "link", "set", inner, "up")
                    lan.members.append(i)
                    addrs.append(addr)
                _ip("-n", name, "route", "add", "default", "dev", "eth0")
                home = self._root / f"h{i + 1}"
                home.mkdir()
                self.hosts.append(Host(name, addrs, home))
            if self.join_here:
                self._join_here()
        except BaseException:
            self.down()
            raise
        return self

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

    @staticmethod
    def _sysctl(namespace: str, setting: str) -> None:
        subprocess.run(["ip", "netns", "exec", namespace, "sysctl", "-q", "-w", setting],
                       capture_output=True, timeout=30)

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
    for tag in {name[len(PREFIX):].rsplit("-", 1)[0] for name in removed}:  # and the hosts' HOMEs
        for home in Path(tempfile.gettempdir()).glob(f"{PREFIX}{tag}-*"):
            shutil.rmtree(home, ignore_errors=True)
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netbed", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build a test bed and leave it up (until `down`)")
    up.add_argument("--hosts", type=int, default=4)
    sub.add_parser("down", help="remove every test bed on this machine")
    args = parser.parse_args(argv)
    if args.command == "down":
        removed = remove_stale(everything=True)
        print(f"removed {len(removed)} namespaces")
        return 0
    reason = NetBed.unavailable()
    if reason:
        print(f"netbed: {reason}", file=sys.stderr)
        return 2
    bed = NetBed(args.hosts, tag=f"cli{os.getpid()}").up()  # not a process id: kept until `down`
    for host in bed.hosts:
        print(f"{host.name}  {' '.join(host.addrs)}  HOME={host.home}")
    print(f"run a command on a host: ip netns exec {bed.hosts[0].name} env HOME={bed.hosts[0].home} <command>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
