"""What only the libp2p transport has: identity on disk, listening, Noise only, real processes
dying or freezing, redialling a peer that came back, and handlers that fail."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

from mesh.errors import DialError, StreamClosed
from mesh.identity import IdentityError, load_or_create_identity, peer_id_of
from mesh.libp2p_transport import Libp2pTransport, ListenError, route_libp2p_logging
from mesh.transport import MessageStream
from protocol import Ping, Pong, Role
from tests.mesh.conftest import ECHO, IO_TIMEOUT, LOOPBACK, echo_hop

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]


async def echo_stream(client: Libp2pTransport, addr: str) -> MessageStream:
    peer_id = await client.dial(addr, timeout=5)
    return MessageStream(await client.open_stream(peer_id, ECHO, timeout=5), Role.CLIENT, io_timeout=IO_TIMEOUT)


@contextlib.asynccontextmanager
async def echo_peer_process():
    """An echo peer in its own OS process (so it can be SIGKILLed or SIGSTOPped); yields (process, addr)."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.mesh.echo_peer"], stdout=subprocess.PIPE, cwd=REPO)
    try:
        output = b""
        with trio.fail_after(30):
            while b"\n" not in output:
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError(f"echo peer exited with {await process.wait()}")
                output += chunk
        yield process, output.split(b"\n", 1)[0].decode()
    finally:
        process.kill()  # SIGKILL ends a stopped process too
        with trio.move_on_after(5):
            await process.wait()
        await process.stdout.aclose()


# --- identity -------------------------------------------------------------------------------

async def test_identity_persists_across_restarts(tmp_path):
    path = tmp_path / "keys" / "identity.key"
    async with Libp2pTransport(identity_path=path, listen=LOOPBACK) as first:
        first_id = first.peer_id
    assert path.stat().st_mode & 0o777 == 0o600
    async with Libp2pTransport(identity_path=path, listen=LOOPBACK) as second:
        assert second.peer_id == first_id
    async with Libp2pTransport(listen=LOOPBACK) as ephemeral:
        assert ephemeral.peer_id != first_id


def test_identity_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "identity.key"
    load_or_create_identity(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_or_create_identity(path)


def test_corrupt_identity_file_is_refused(tmp_path):
    path = tmp_path / "identity.key"
    path.write_bytes(b"not a key")
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match="not a serialized libp2p private key"):
        load_or_create_identity(path)


async def test_address_in_use_is_a_listen_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=str(port)):
            async with Libp2pTransport(listen=[f"/ip4/127.0.0.1/tcp/{port}"]):
                pass


async def test_a_port_held_by_another_libp2p_host_is_a_listen_error():
    """libp2p's listeners set SO_REUSEPORT (for hole punching): a second one on the same port would
    bind silently and share its connections."""
    async with Libp2pTransport(listen=["/ip4/127.0.0.1/tcp/0"]) as first:
        port = first.addrs[0].split("/")[4]
        with pytest.raises(ListenError, match=f"{port}: address in use"):
            async with Libp2pTransport(listen=[f"/ip4/127.0.0.1/tcp/{port}"]):
                pass


def test_a_listen_address_that_is_not_a_multiaddr_is_a_listen_error():
    with pytest.raises(ListenError, match="not a multiaddr like /ip4/0.0.0.0/tcp/4001"):
        Libp2pTransport(listen=["/ip4/not-an-ip/tcp/1"])


def test_libp2p_logging_is_relayed_under_mesh_and_demoted(caplog):
    route_libp2p_logging()
    caplog.set_level(logging.DEBUG, logger="mesh.libp2p")
    logging.getLogger("libp2p.network.swarm").error("peer %s went away", "X")
    logging.getLogger("libp2p.network.swarm").info("chatter")  # below libp2p's level: never created
    relayed = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "mesh.libp2p.libp2p.network.swarm"]
    assert relayed == [(logging.INFO, "peer X went away")]


# --- security -------------------------------------------------------------------------------

async def test_plaintext_only_peer_cannot_connect():
    key_pair = create_new_key_pair()
    plaintext = new_host(key_pair=key_pair, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)},
                         listen_addrs=[multiaddr.Multiaddr(LOOPBACK[0])])
    async with Libp2pTransport(listen=LOOPBACK) as ours, plaintext.run([multiaddr.Multiaddr(LOOPBACK[0])]):
        ours.set_handler(ECHO, echo_hop)
        with trio.fail_after(10), pytest.raises(Exception):  # whatever libp2p raises, no connection
            await plaintext.connect(info_from_p2p_addr(multiaddr.Multiaddr(ours.addrs[0])))
        assert ours.connected_peers() == []
        plaintext_addr = f"{plaintext.get_addrs()[0]}"
        with trio.fail_after(10), pytest.raises(DialError):
            await ours.dial(plaintext_addr, timeout=5)
        await plaintext.close()


# --- failures -------------------------------------------------------------------------------

async def test_handler_exception_resets_the_stream_and_the_host_keeps_serving():
    async def broken(raw):
        await raw.receive_some(100)
        raise RuntimeError("handler bug")

    async with Libp2pTransport(listen=LOOPBACK) as client, Libp2pTransport(listen=LOOPBACK) as server:
        server.set_handler("/hearth/broken/1", broken)
        server.set_handler(ECHO, echo_hop)
        peer_id = await client.dial(server.addrs[0], timeout=5)
        raw = await client.open_stream(peer_id, "/hearth/broken/1", timeout=5)
        stream = MessageStream(raw, Role.CLIENT, io_timeout=5)
        await stream.send(Ping(nonce=1))
        with trio.fail_after(5), pytest.raises(StreamClosed):
            await stream.receive()
        echo = await echo_stream(client, server.addrs[0])
        assert await echo.request(Ping(nonce=2)) == Pong(nonce=2)


async def test_killed_peer_process_ends_the_stream_at_once():
    async with echo_peer_process() as (process, addr), Libp2pTransport(listen=LOOPBACK) as client:
        stream = await echo_stream(client, addr)
        assert await stream.request(Ping(nonce=1)) == Pong(nonce=1)
        process.send_signal(signal.SIGKILL)
        started = trio.current_time()
        with pytest.raises(StreamClosed):
            await stream.receive(timeout=5)
        assert trio.current_time() - started < 2.0


async def test_frozen_peer_is_noticed_by_health_checks_and_dials_to_it_time_out():
    """SIGSTOP: no FIN, no RST. Pings fail and the connection is aborted within seconds."""
    async with echo_peer_process() as (process, addr), Libp2pTransport(listen=LOOPBACK) as client:
        stream = await echo_stream(client, addr)
        assert await stream.request(Ping(nonce=1)) == Pong(nonce=1)
        process.send_signal(signal.SIGSTOP)
        started = trio.current_time()
        with pytest.raises(StreamClosed):
            await stream.receive(timeout=30)  # health monitoring ends it, not this timeout
        assert trio.current_time() - started < 10.0
        async with Libp2pTransport(listen=LOOPBACK) as newcomer:
            started = trio.current_time()
            with pytest.raises(DialError, match="no connection within"):
                await newcomer.dial(addr, timeout=1.5)
            assert trio.current_time() - started < 3.0


async def test_peer_that_comes_back_can_be_redialled_at_once(tmp_path):
    """After a failed dial libp2p refuses to dial that peer for 60 s; the transport clears that."""
    identity = tmp_path / "server.key"
    async with Libp2pTransport(listen=LOOPBACK) as client:
        async with Libp2pTransport(identity_path=identity, listen=LOOPBACK) as server:
            addr = server.addrs[0]
            assert await client.dial(addr, timeout=5) == server.peer_id
        with pytest.raises(DialError):
            await client.dial(addr, timeout=5)
        port = multiaddr.Multiaddr(addr).value_for_protocol("tcp")
        async with Libp2pTransport(identity_path=identity, listen=[f"/ip4/127.0.0.1/tcp/{port}"]) as back:
            back.set_handler(ECHO, echo_hop)
            assert back.addrs[0] == addr
            stream = await echo_stream(client, addr)
            assert await stream.request(Ping(nonce=3)) == Pong(nonce=3)


async def test_open_stream_uses_addresses_from_discovery():
    async with Libp2pTransport(listen=LOOPBACK) as client, Libp2pTransport(listen=LOOPBACK) as server:
        server.set_handler(ECHO, echo_hop)
        client.add_peer_addrs(server.peer_id, server.addrs + ["not a multiaddr"])
        raw = await client.open_stream(server.peer_id, ECHO, timeout=5)
        stream = MessageStream(raw, Role.CLIENT, io_timeout=IO_TIMEOUT)
        assert await stream.request(Ping(nonce=4)) == Pong(nonce=4)


async def test_open_stream_to_unknown_peer_is_a_dial_error():
    async with Libp2pTransport(listen=LOOPBACK) as client:
        stranger = peer_id_of(load_or_create_identity(None))
        with pytest.raises(DialError, match="no known address"):
            await client.open_stream(stranger, ECHO, timeout=2)
        with pytest.raises(DialError, match="not a peer id"):
            await client.open_stream("QmNotAPeer", ECHO, timeout=2)
        with pytest.raises(DialError, match="/p2p/"):
            await client.dial("/ip4/127.0.0.1/tcp/1", timeout=2)


def _lan_ip() -> str | None:
    from mesh.addresses import local_interfaces

    return next((str(i.ip) for i in local_interfaces() if i.ip.version == 4 and not i.ip.is_loopback), None)


@pytest.mark.skipif(_lan_ip() is None, reason="needs a non-loopback IPv4 interface")
async def test_a_wildcard_listener_tells_each_peer_its_own_interface_first_and_loopback_only_over_loopback():
    """What identify hands on (and the DHT passes to others): never 0.0.0.0; to a peer that came
    over loopback, loopback too; to a peer that came over the LAN, no loopback at all. (The order
    is mesh.addresses.offered's, tested in test_addresses.py; the peerstore does not keep it.)"""
    lan = _lan_ip()
    async with Libp2pTransport(listen=["/ip4/0.0.0.0/tcp/0"]) as node, \
            Libp2pTransport(listen=LOOPBACK) as near, Libp2pTransport(listen=LOOPBACK) as far:
        port = multiaddr.Multiaddr(node.addrs[0]).value_for_protocol("tcp")
        assert node.addrs == [f"/ip4/{lan}/tcp/{port}/p2p/{node.peer_id}"] + [
            a for a in node.addrs[1:] if "/ip4/127." not in a]  # the LAN first; loopback not announced
        await near.dial(f"/ip4/127.0.0.1/tcp/{port}/p2p/{node.peer_id}", timeout=5)
        await far.dial(node.addrs[0], timeout=5)
        from libp2p.peer.id import ID

        def told(peer: Libp2pTransport) -> list[str]:
            protocols_known = peer.host.get_peerstore().get_protocols(ID.from_base58(node.peer_id))
            addrs = [str(a) for a in peer.host.get_peerstore().addrs(ID.from_base58(node.peer_id))]
            return addrs if protocols_known else []

        with trio.fail_after(10):  # identify runs in the background after the connection
            while not (told(near) and told(far)):
                await trio.sleep(0.05)
        assert not any("0.0.0.0" in a for a in told(near) + told(far))
        assert any(a.startswith("/ip4/127.0.0.1/") for a in told(near))
        assert any(a.startswith(f"/ip4/{lan}/tcp/{port}") for a in told(near))
        assert not any(a.startswith("/ip4/127.") for a in told(far))


async def test_a_dial_tries_every_address_of_a_peer_not_just_the_first():
    """py-libp2p alone dials one TCP address per peer (and drops loopback when another exists): a
    peer known at an address that never answers and at one that works was unreachable."""
    async with Libp2pTransport(listen=LOOPBACK) as node, Libp2pTransport(listen=LOOPBACK) as client:
        port = multiaddr.Multiaddr(node.addrs[0]).value_for_protocol("tcp")
        silent = f"/ip4/198.51.100.7/tcp/{port}/p2p/{node.peer_id}"  # TEST-NET-2: no host answers there
        client.add_peer_addrs(node.peer_id, [silent, node.addrs[0]])
        node.set_handler(ECHO, echo_hop)
        started = trio.current_time()
        stream = MessageStream(await client.open_stream(node.peer_id, ECHO, timeout=5), Role.CLIENT, io_timeout=IO_TIMEOUT)
        await stream.send(Ping(nonce=7))
        assert await stream.receive(timeout=IO_TIMEOUT) == Pong(nonce=7)
        assert trio.current_time() - started < 3.0  # the second address started 0.25 s after the first


async def test_a_peer_known_only_at_a_wildcard_is_not_dialled_there():
    async with Libp2pTransport(listen=LOOPBACK) as client:
        stranger = peer_id_of(create_new_key_pair())
        client.add_peer_addrs(stranger, [f"/ip4/0.0.0.0/tcp/4001/p2p/{stranger}"])
        with pytest.raises(DialError, match="no dialable address"):
            await client.open_stream(stranger, ECHO, timeout=5)
