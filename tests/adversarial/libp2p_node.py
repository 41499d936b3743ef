"""A real node (the tiny llama's blocks [0, 6), `node.node.Node`) served over a libp2p host on
127.0.0.1 in this process, and an honest client's run through it: for the adversarial tests whose
attack is at the network level (connections, streams, frames)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from pathlib import Path

import trio

from mesh.client import Client, ClientOptions
from mesh.discovery import MemoryDirectory
from mesh.libp2p_transport import Libp2pTransport
from node.intake import IntakeLimits
from node.node import Node
from node.server import InferenceServer
from node.sessions import SessionLimits
from protocol import Codec
from shard.manifest import model_digest
from shard.sampling import SamplingParams
from shard.span import load_span

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
PROMPT = [5, 17, 33, 2, 9, 71, 4]
TOKENS = 8


@dataclass
class ServedNode:
    node: Node
    transport: Libp2pTransport
    directory: MemoryDirectory
    model_dir: Path
    digest: str

    @property
    def port(self) -> int:
        return int(self.transport.addrs[0].split("/tcp/")[1].split("/")[0])


@contextlib.asynccontextmanager
async def libp2p_node(model_dir: Path, *, allowed_peers: Collection[str] | None = None,
                      intake: IntakeLimits | None = None) -> AsyncIterator[ServedNode]:
    """A node listening on 127.0.0.1, announced in a `MemoryDirectory`; stopped on exit. `intake`
    replaces the household defaults of what it buffers (smaller ones make a test quicker)."""
    directory, digest = MemoryDirectory(trio.current_time), model_digest(model_dir)
    node = Node(load_span(model_dir, 0, 6), "tiny", digest, wall_clock=trio.current_time, token_seconds=0.001,
                limits=SessionLimits(idle_timeout_s=30), allowed_peers=allowed_peers)
    if intake is not None:  # Node does not take them (yet): the same server, built with them
        node.server = InferenceServer(node.manager, node.span_info, allowed_peers=allowed_peers, intake=intake,
                                      metrics=node.metrics)
    async with Libp2pTransport(listen=LOOPBACK) as transport, trio.open_nursery() as nursery:
        await nursery.start(node.run, transport, directory)
        yield ServedNode(node, transport, directory, model_dir, digest)
        nursery.cancel_scope.cancel()


async def honest_tokens(served: ServedNode, transport: Libp2pTransport, *, timeout: float = 10) -> list[int]:
    """The tokens an honest client gets through the node, within a normal request's time."""
    client = Client(transport, served.directory, served.model_dir, options=ClientOptions(codec=Codec.FP32))
    with trio.fail_after(timeout):
        report = await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=TOKENS))
    return report.token_ids


def rss_bytes() -> int:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")
