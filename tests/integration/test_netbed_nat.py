"""Households behind NAT routers on the test bed (tools/netbed.py): what gets through and what not.

Probes are small Python programs run inside the hosts: `serve` listens on a port (first sending a
SYN from it to the other side's public address, to punch a hole, when asked) and reports the first
connection it gets; `connect` connects, from a given local port, with a one-second timeout. Every
exchange on the bridges takes well under a millisecond, so a connect that has not succeeded within
a second never will.
"""

from __future__ import annotations

import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tools.netbed import PREFIX, Home, NetBed, remove_stale

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(30)

PROBE = r"""
import errno, select, socket, sys

def bound(port):
    # a TCP socket on `port` of every interface that other sockets may share (SO_REUSEPORT)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("", port))
    return sock

def say(*words):
    print(*words, flush=True)

def serve(port, punch_to="", keep="keep"):
    # listen on `port`, having sent a SYN from it to punch_to (ADDR:PORT) if given; greet the
    # first connection, by the punching socket (TCP simultaneous open) or the listener, and say
    # which and from where; "nothing" if stdin closes first
    listener = bound(int(port))
    listener.listen()
    punching = []
    if punch_to:
        punch = bound(int(port))
        punch.setblocking(False)
        addr, _, punch_port = punch_to.partition(":")
        punch.connect_ex((addr, int(punch_port)))
        if keep == "keep":
            punching.append(punch)
        else:
            punch.close()
    say("ready")
    readable, connected, _ = select.select([listener, sys.stdin], punching, [], 10)
    if connected:
        failure = connected[0].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if failure:
            return say("punch failed", errno.errorcode[failure])
        conn, how = connected[0], "punch"
    elif listener in readable:
        conn, how = listener.accept()[0], "accept"
    else:
        return say("nothing")
    conn.setblocking(True)
    conn.sendall(b"hello")
    say(how, *conn.getpeername())

def connect(addr, port, from_port="0"):
    # connect to addr:port from local port `from_port`; "connected" and the greeting, or why not
    sock = bound(int(from_port))
    sock.settimeout(1)
    try:
        sock.connect((addr, int(port)))
        say("connected", sock.recv(5).decode())
    except OSError as err:
        say("failed", errno.errorcode[err.errno] if err.errno else "timeout")

globals()[sys.argv[1]](*sys.argv[2:])
"""


def serve(bed: NetBed, host, port: int, punch_to: str = "", keep: bool = True) -> subprocess.Popen:
    """The `serve` probe on `host`, once it listens (and has sent its punching SYN)."""
    argv = [sys.executable, "-c", PROBE, "serve", str(port), punch_to, "keep" if keep else "close"]
    process = bed.popen(host, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
    ready, _, _ = select.select([process.stdout], [], [], 10)
    line = process.stdout.readline() if ready else b""
    if line != b"ready\n":
        process.kill()
        raise AssertionError(f"the probe did not start: {(line + process.communicate(timeout=10)[0]).decode()}")
    return process


def report(process: subprocess.Popen) -> str:
    """What the `serve` probe got: its stdin is closed, so "nothing" if no connection came."""
    out, _ = process.communicate(input=b"", timeout=10)
    return out.decode().strip()


def connect(bed: NetBed, host, addr: str, port: int, from_port: int = 0) -> str:
    argv = [sys.executable, "-c", PROBE, "connect", addr, str(port), str(from_port)]
    return bed.run(host, argv, capture_output=True, text=True, timeout=10).stdout.strip()


@pytest.mark.parametrize("nat", ["cone", "symmetric"])
def test_a_home_host_reaches_the_internet_from_its_routers_address(netbed, nat):
    bed = netbed(1, homes=[Home(nat=nat)])
    server, alice = bed.hosts
    assert not server.behind_nat and server.public_addr == server.addr == "10.77.0.1"
    assert alice.behind_nat and alice.addr == "10.101.0.2"
    assert alice.public_addr == alice.router.public == bed.routers[0].public == "10.77.0.101"
    probe = serve(bed, server, 4001)
    assert connect(bed, alice, server.addr, 4001, from_port=5001) == "connected hello"
    seen = report(probe).split()
    assert seen[:2] == ["accept", alice.public_addr]
    if nat == "cone":
        assert seen[2] == "5001"  # the port kept


def test_nothing_on_the_internet_reaches_into_a_home(netbed):
    bed = netbed(1, homes=[Home(2)])
    outsider, alice, bob = bed.hosts
    probe = serve(bed, alice, 4001)
    assert connect(bed, outsider, alice.addr, 4001) in ("failed timeout", "failed EHOSTUNREACH")
    assert connect(bed, outsider, alice.public_addr, 4001) == "failed timeout"  # dropped, not refused
    assert connect(bed, bob, alice.addr, 4001, from_port=5001) == "connected hello"  # from inside the home
    assert report(probe) == f"accept {bob.addr} 5001"  # the first connection that came


def test_two_homes_do_not_reach_each_other_directly(netbed):
    bed = netbed(0, homes=[Home(), Home()])
    alice, bob = bed.hosts
    assert alice.router is not bob.router
    probe = serve(bed, alice, 4001)
    assert connect(bed, bob, alice.addr, 4001) in ("failed timeout", "failed EHOSTUNREACH")
    assert connect(bed, bob, alice.public_addr, 4001) == "failed timeout"
    assert report(probe) == "nothing"


@pytest.mark.parametrize("nat, keep, made", [
    ("cone", True, True),
    ("symmetric", True, False),  # bob's SYN leaves from a random port, to a port alice's router did not open
    ("cone", False, False),  # the listener's SYN-ACK is out of the window conntrack expects: dropped
], ids=["cone-cone", "symmetric-symmetric", "cone-cone-punch-closed"])
def test_tcp_hole_punching_by_port_reuse(netbed, nat, keep, made):
    """Alice, listening on 4001, sends a SYN from 4001 to bob's public address at 5001 (dropped by
    bob's router, but alice's router now expects an answer from there); bob connects from 5001 to
    alice's public address at 4001. Through two cone NATs the ports are kept, bob's SYN fits and the
    connection is made by simultaneous open on alice's punching socket."""
    bed = netbed(0, homes=[Home(nat=nat), Home(nat=nat)])
    alice, bob = bed.hosts
    probe = serve(bed, alice, 4001, punch_to=f"{bob.public_addr}:5001", keep=keep)
    outcome = connect(bed, bob, alice.public_addr, 4001, from_port=5001)
    if made:
        assert (outcome, report(probe)) == ("connected hello", f"punch {bob.public_addr} 5001")
    else:
        assert (outcome, report(probe)) == ("failed timeout", "nothing")


def leftovers(tag: str) -> list[str]:
    """The namespaces, link here and HOMEs of test bed `tag` that still exist."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout.split()
    namespaces = [name for name in listed if name.startswith(f"{PREFIX}{tag}-")]
    link = subprocess.run(["ip", "link", "show", f"hb{tag}"], capture_output=True, timeout=30).returncode == 0
    homes = [str(path) for path in Path(tempfile.gettempdir()).glob(f"{PREFIX}{tag}-*")]
    return namespaces + [f"hb{tag}"] * link + homes


@pytest.fixture
def nat_bed():
    """Skips where homes cannot be built."""
    reason = NetBed.unavailable(nat=True)
    if reason:
        pytest.skip(f"no NAT routers (nftables) in network namespaces on this machine: {reason}")


def test_down_leaves_nothing_behind(nat_bed):
    bed = NetBed(1, homes=[Home(2), Home(nat="symmetric")], join_here=True).up()
    try:
        sleeper = bed.popen(bed.hosts[1], ["sleep", "60"])
        assert len(leftovers(bed.tag)) == 3 + 2 + 4 + 1 + 1  # switches, routers, hosts, link here, HOMEs
    finally:
        bed.down()
    assert sleeper.poll() == -signal.SIGKILL
    assert leftovers(bed.tag) == []


def test_remove_stale_clears_the_homes_of_a_process_that_died(nat_bed):
    script = ("from tools.netbed import Home, NetBed; import time; "
              "bed = NetBed(1, homes=[Home()], join_here=True).up(); print(bed.tag, flush=True); time.sleep(60)")
    creator = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([creator.stdout], [], [], 20)
        tag = creator.stdout.readline().strip() if ready else ""
    finally:
        creator.kill()
        creator.communicate(timeout=10)
    assert tag and leftovers(tag)
    remove_stale()
    assert leftovers(tag) == []
