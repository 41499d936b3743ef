"""Across homes: nodes behind household NATs serve a client in a third home through relays.

The test bed (tools/netbed.py) has an internet LAN with two public hosts, each running `hearth
relay` (the nodes' bootstrap addresses; the client's is the first), and three homes, each a LAN behind its own NAT router
(nftables masquerade; inbound connections dropped): node A serves blocks 0:3 in the first, node B
blocks 3:6 in the second, the client runs in the third. Nobody can dial a home, so each node
learns it is private from the relays' dial-back checks, takes a slot on both relays and announces
its relayed addresses; the client reaches the nodes through a relay, then:

- through cone NATs, hole-punches both (DCUtR: both ends dial each other from their listening
  ports), runs the answer directly, and loses no token when both relays are killed mid-answer;
- through symmetric NATs, where no punch can work, runs the answer over a relay, and when that
  relay is killed mid-answer, replays each hop through the other relay: the same tokens.
"""

from __future__ import annotations

import pytest
import trio

from node.swarm import HOST_LISTEN, NodeProcess
from tests.integration.conftest import NODE_ARGS, local_tokens
from tests.integration.test_hosts import HostClient
from tools.netbed import Home

pytestmark = pytest.mark.timeout(300)
RELAYED_BOTH = "reachable through 2 relays"


async def start_swarm(nursery: trio.Nursery, bed, model_dir) -> tuple[list[NodeProcess], list[NodeProcess]]:
    """Two relays on the public hosts, nodes A (0:3) and B (3:6) in the first two homes; returns
    (relays, nodes) once both nodes hold a slot on both relays."""
    first, second, home_a, home_b, _ = bed.hosts
    relays = [await NodeProcess.start(nursery, name, ["--listen", HOST_LISTEN], host=host, command="relay")
              for name, host in (("relay1", first), ("relay2", second))]  # they meet through the nodes
    for relay in relays:
        await relay.wait_ready()
    bootstrap = [arg for relay in relays for arg in ("--bootstrap", relay.addr)]
    nodes = [await NodeProcess.start(nursery, name, ["--model", str(model_dir), "--blocks", blocks,
                                                     "--listen", HOST_LISTEN, *bootstrap, *NODE_ARGS], host=host)
             for name, blocks, host in (("A", "0:3", home_a), ("B", "3:6", home_b))]
    for node in nodes:
        await node.wait_ready()
        line = await node.wait_for("reachability: private", timeout=60)
        assert f"seen from outside as /ip4/{bed.hosts[nodes.index(node) + 2].public_addr}" in line, line
    for node in nodes:
        await node.wait_for_text(RELAYED_BOTH, timeout=60)
        await node.wait_for_text("/p2p-circuit/", timeout=30)  # announced (re-announced within 2 s)
    return relays, nodes


@pytest.mark.parametrize("nat", ["cone", "symmetric"])
async def test_nodes_in_two_homes_serve_a_third_through_relays(netbed, checkpoint_factory, nat):
    model_dir = checkpoint_factory("llama")
    bed = netbed(2, homes=[Home(nat=nat)] * 3)
    client_home = bed.hosts[4]
    async with trio.open_nursery() as readers:
        relays, nodes = await start_swarm(readers, bed, model_dir)
        try:
            for node in nodes:  # every address a node announced is its own private one or relayed
                addrs = [line.split()[-1] for line in node.lines if line.startswith("listening on ")]
                assert any("/p2p-circuit/" in a for a in addrs), addrs
            async with HostClient(client_home, "--bootstrap", relays[0].addr, "--model", str(model_dir),
                                  "--tokens", "24", "--pause-at", "5") as client:
                pause = await client.event()  # paused before the 5th step to node B: kill relays now
                if nat == "cone":
                    doomed = relays  # both: the hops were punched, nothing may notice
                else:  # the one carrying the paused hop (the pause names it); the other stays
                    doomed = [r for r in relays if r.peer_id == pause["relay"]]
                    assert len(doomed) == 1, (pause, [r.peer_id for r in relays])
                for relay in doomed:
                    await relay.kill()  # SIGKILL, by process id
                await client.resume()
                report = await client.report()
        finally:
            with trio.CancelScope(shield=True):
                for process in [*nodes, *relays]:
                    await process.kill()  # by process id; what is under test ran before this
            readers.cancel_scope.cancel()
    assert report["token_ids"] == local_tokens(model_dir, [5, 17, 33, 2, 9, 71, 4], 24)
    if nat == "cone":  # punched before the first step, so killing both relays touched nothing
        assert {hop["path"] for hop in report["hops"]} == {"hole-punched"}, report["hops"]
        assert report["recoveries"] == [], report
    else:  # relayed all along; the hops on the killed relay were replayed through the other one
        assert {hop["path"] for hop in report["hops"]} == {"relayed"}, report["hops"]
        assert report["recoveries"], "the relay carried the answer: killing it must have cost a replay"
        assert all(hop["relay"] not in (None, doomed[0].peer_id) for hop in report["hops"]), report["hops"]
        assert {r["failed_peer"] for r in report["recoveries"]} <= {n.peer_id for n in nodes}
        assert {hop["peer_id"] for hop in report["hops"]} == {n.peer_id for n in nodes}
