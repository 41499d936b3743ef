"""Joining the swarm over libp2p: a transport, its bootstrap dials, and DHT discovery.

`joined(...)` is what both the node daemon and the client use to enter the network: it starts a
libp2p host, dials the bootstrap addresses (falling back to the peer cache when none answers),
and runs Kademlia discovery on top. `connect(...)` adds a `Client` for a model directory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import trio

from mesh.client import Client, ClientOptions
from mesh.dht import DhtDiscovery
from mesh.errors import DialError
from mesh.libp2p_transport import Libp2pTransport
from mesh.peer_cache import PeerCache, rejoin

log = logging.getLogger("hearth.mesh")

DIAL_TIMEOUT_S = 10.0


async def dial_bootstrap(transport: Libp2pTransport, bootstrap: Sequence[str], cache: PeerCache | None) -> list[str]:
    """Dial every bootstrap address at once; with none reachable, the cached peers. Returns peer ids reached."""
    reached: list[str] = []

    async def dial(addr: str) -> None:
        try:
            reached.append(await transport.dial(addr, timeout=DIAL_TIMEOUT_S))
        except DialError as err:
            log.warning("bootstrap peer unreachable: %s", err)

    async with trio.open_nursery() as nursery:
        for addr in bootstrap:
            nursery.start_soon(dial, addr)
    if not reached and cache is not None and cache.peers():
        reached = await rejoin(transport, cache, timeout=DIAL_TIMEOUT_S)
    return reached


@contextmanager
def single_errors() -> Iterator[None]:
    """Re-raise an exception group holding one exception as that exception.

    The libp2p host and the DHT run in nurseries, which wrap whatever the caller's block raises
    (a `NoRouteError`, say) in exception groups; callers should see the error itself.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from group
        raise


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    found = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


@asynccontextmanager
async def joined(*, bootstrap: Sequence[str] = (), listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
                 identity_path: os.PathLike | str | None = None, peer_cache_path: os.PathLike | str | None = None,
                 enable_mdns: bool = False, wall_clock: Callable[[], float], require_peers: bool = False
                 ) -> AsyncIterator[tuple[Libp2pTransport, DhtDiscovery]]:
    """The libp2p host and DHT discovery of a node or client. With `require_peers` (clients), a
    bootstrap list none of whose peers (nor any cached peer) answers raises `DialError` at once;
    a node instead keeps waiting for peers to find it."""
    cache = PeerCache(peer_cache_path, clock=wall_clock) if peer_cache_path else None
    with single_errors():
        async with _joined(bootstrap, listen, identity_path, cache, enable_mdns, wall_clock,
                           require_peers) as joined_pair:
            yield joined_pair


@asynccontextmanager
async def _joined(bootstrap, listen, identity_path, cache, enable_mdns, wall_clock, require_peers):
    async with Libp2pTransport(identity_path=identity_path, listen=listen, enable_mdns=enable_mdns,
                               peer_cache=cache) as transport:
        reached = await dial_bootstrap(transport, bootstrap, cache)
        if bootstrap and not reached:
            if require_peers:
                raise DialError(", ".join(bootstrap), "no bootstrap or cached peer answered")
            log.warning("no bootstrap or cached peer answered; waiting for peers to find us")
        async with DhtDiscovery(transport, clock=wall_clock) as discovery:
            yield transport, discovery


@asynccontextmanager
async def connect(*, bootstrap: Sequence[str] = (), model: str | Path, options: ClientOptions = ClientOptions(),
                  wall_clock: Callable[[], float] | None = None, listen: Sequence[str] | None = None,
                  peer_cache_path: os.PathLike | str | None = None, mdns: bool = False) -> AsyncIterator[Client]:
    """`async with mesh.connect(bootstrap=[...], model=DIR) as client:` then `client.generate(...)`.

    With `mdns` the client also finds the nodes of its LAN (then `bootstrap` may be empty: the
    request waits for them until its deadline). It listens on every interface when it finds peers
    on the LAN or has a bootstrap peer on another machine (hole punching to a node behind NAT dials
    from the listening port, on the interface that reaches it), else on loopback only.
    """
    import time

    if not bootstrap and not mdns:
        raise ValueError("give bootstrap addresses, or mdns=True to find the LAN's nodes")
    elsewhere = mdns or not all(_on_loopback(addr) for addr in bootstrap)
    listen = listen or (("/ip4/0.0.0.0/tcp/0",) if elsewhere else ("/ip4/127.0.0.1/tcp/0",))
    async with joined(bootstrap=bootstrap, listen=listen, peer_cache_path=peer_cache_path, enable_mdns=mdns,
                      wall_clock=wall_clock or time.time, require_peers=bool(bootstrap)) as (transport, discovery):
        client = await trio.to_thread.run_sync(lambda: Client(transport, discovery, model, options=options))
        yield client


def _on_loopback(addr: str) -> bool:
    """Whether a bootstrap multiaddr names this machine (127.0.0.0/8, ::1, localhost)."""
    parts = addr.split("/")
    host = parts[2] if len(parts) > 2 else ""
    return host.startswith("127.") or host in ("::1", "localhost")
