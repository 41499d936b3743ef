"""A household's swarm on distinct hosts: real `hearth` processes in network namespaces on a bridge.

Each host has its own interfaces, addresses and HOME (tools/netbed.py); nodes listen the README's
way, on every interface at port 4001. Before the fix in mesh/libp2p_addressing.py, nodes that
joined through a bootstrap node were announced (by libp2p's identify and DHT) at 0.0.0.0, dialled
only there, and the first test below failed with "nobody serves [2, 6)".
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trio

from node.swarm import HOST_LISTEN, NodeProcess
from tests.integration.conftest import NODE_ARGS, local_tokens, run_command
from tests.integration.test_auto_span import KV_BYTES, chosen, memory_for

PROMPT = [5, 17, 33, 2, 9, 71, 4]
ROOT = Path(__file__).resolve().parents[2]
API_KEY = "household-secret"


async def hearth(bed_host, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`hearth ARGS` typed on `bed_host`."""
    return await run_command(bed_host.command([sys.executable, "-m", "node.cli", *args]), env=bed_host.env(),
                             cwd=ROOT, timeout=timeout)


class HostClient:
    """tests/integration/host_client.py running on a host of the test bed, for `async with`: killed,
    by process id, on the way out."""

    def __init__(self, bed_host, *args: str):
        argv = [sys.executable, "-m", "tests.integration.host_client", "--prompt-ids", ",".join(map(str, PROMPT)), *args]
        self.command, self.env = bed_host.command(argv), bed_host.env()
        self._unread = b""

    async def __aenter__(self) -> HostClient:
        self.process = await trio.lowlevel.open_process(self.command, env=self.env, cwd=ROOT, stdin=subprocess.PIPE,
                                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return self

    async def __aexit__(self, *exc_info) -> None:
        with trio.CancelScope(shield=True), trio.fail_after(10):
            self.process.kill()  # `ip netns exec` execs the client: the process id is its own
            await self.process.wait()
            for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
                await stream.aclose()

    async def event(self, timeout: float = 120) -> dict:
        line = await self._readline(timeout)
        if not line:
            with trio.fail_after(10):
                await self.process.wait()
                stderr = b"".join([chunk async for chunk in self.process.stderr]).decode(errors="replace")
            raise AssertionError(f"client exited ({self.process.returncode}): {stderr[-3000:]}")
        return json.loads(line)

    async def _readline(self, timeout: float) -> str:
        with trio.move_on_after(timeout):
            while b"\n" not in self._unread:
                chunk = await self.process.stdout.receive_some()
                if not chunk:  # the client exited
                    line, self._unread = self._unread, b""
                    return line.decode()
                self._unread += chunk
            line, self._unread = self._unread.split(b"\n", 1)
            return line.decode()
        self.process.kill()
        raise AssertionError(f"client said nothing within {timeout} s")

    async def resume(self) -> None:
        await self.process.stdin.send_all(b"go\n")

    async def report(self, timeout: float = 120) -> dict:
        event = await self.event(timeout)
        assert event["event"] == "report", event
        with trio.fail_after(10):
            await self.process.wait()
        return event


def node_ip(node: NodeProcess) -> str:
    return node.addr.split("/")[2]


async def test_the_readme_commands_typed_on_separate_hosts_form_one_swarm(netbed, hosts_swarm_factory, chat_model_dir):
    """Three `hearth node --listen /ip4/0.0.0.0/tcp/4001`, the second and third bootstrapped from the
    first, `hearth generate` on a fourth host, and the first node's OpenAI API used from there too."""
    bed = netbed(4)
    async with hosts_swarm_factory(chat_model_dir, bed, 3) as swarm:
        first = await swarm.add(0, 2, extra_args=["--api-port", "8000", "--api-host", "0.0.0.0", "--api-key", API_KEY])
        await first.wait_ready()
        await swarm.add(2, 4)
        await swarm.add(4, 6)
        for node in swarm.nodes:
            await node.wait_ready()
        assert [node_ip(n) for n in swarm.nodes] == [h.addr for h in bed.hosts[:3]]  # each announces its LAN address

        typed = await hearth(bed.hosts[3], "generate", "--bootstrap", first.addr, "--model", str(chat_model_dir),
                             "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "8", "--codec", "fp32",
                             "--json")
        assert typed.returncode == 0, typed.stderr[-3000:]
        out = json.loads(typed.stdout)
        assert out["token_ids"] == local_tokens(chat_model_dir, PROMPT, 8)
        assert [hop["peer_id"] for hop in out["route"]] == [n.peer_id for n in swarm.nodes]

        request = {"model": chat_model_dir.name, "prompt": "hello", "max_tokens": 4, "temperature": 0}
        script = ("import json, sys, urllib.request as u; r = u.Request(sys.argv[1], data=sys.argv[2].encode(), headers="
                  "{'Content-Type': 'application/json', 'Authorization': 'Bearer ' + sys.argv[3]}); "
                  "print(u.urlopen(r, timeout=60).read().decode())")
        url = f"http://{bed.hosts[0].addr}:8000/v1/completions"
        answer = await run_command(bed.hosts[3].command([sys.executable, "-c", script, url, json.dumps(request), API_KEY]))
        assert answer.returncode == 0, answer.stderr[-3000:]
        body = json.loads(answer.stdout)
        assert body["usage"]["completion_tokens"] == 4 and body["choices"][0]["text"]


async def test_a_node_killed_mid_answer_on_another_host_changes_nothing(netbed, hosts_swarm_factory, checkpoint_factory):
    model_dir = checkpoint_factory("llama")
    bed = netbed(4)
    async with hosts_swarm_factory(model_dir, bed, 3) as swarm:
        await swarm.start([(0, 3), (3, 6), (3, 6)])  # the second half twice
        async with HostClient(bed.hosts[3], "--bootstrap", swarm.nodes[0].addr, "--model", str(model_dir),
                              "--tokens", "24", "--pause-at", "5") as client:
            pause = await client.event()
            victim = next(n for n in swarm.nodes if n.peer_id == pause["peer_id"])
            await victim.kill()  # SIGKILL, by process id, while the client waits to send its 5th step there
            await client.resume()
            report = await client.report()
    assert report["token_ids"] == local_tokens(model_dir, PROMPT, 24)
    [recovery] = report["recoveries"]
    assert recovery["failed_peer"] == victim.peer_id


async def test_nodes_without_blocks_on_separate_hosts_cover_the_model(netbed, hosts_swarm_factory, checkpoint_factory):
    model_dir = checkpoint_factory("llama")
    bed = netbed(3)
    memory = ["--memory", memory_for(model_dir, 3), "--kv-cache-bytes", str(KV_BYTES)]
    async with hosts_swarm_factory(model_dir, bed, 2) as swarm:
        first = await swarm.add(None, None, extra_args=memory)
        await first.wait_ready()
        second = await swarm.add(None, None, extra_args=memory)
        await second.wait_ready()
        assert {await chosen(first), await chosen(second)} == {(0, 3), (3, 6)}  # the second saw the first's span across hosts
        async with HostClient(bed.hosts[2], "--bootstrap", second.addr, "--model", str(model_dir)) as client:
            report = await client.report()
    assert report["token_ids"] == local_tokens(model_dir, PROMPT, 12)


async def test_mdns_alone_forms_the_swarm_with_no_bootstrap_anywhere(netbed, checkpoint_factory, tmp_path):
    model_dir = checkpoint_factory("llama")
    bed = netbed(3)
    nodes = []
    async with trio.open_nursery() as readers:
        try:
            for i, blocks in enumerate(["0:3", "3:6"]):
                nodes.append(await NodeProcess.start(readers, f"node{i}", [
                    "--model", str(model_dir), "--blocks", blocks, "--listen", HOST_LISTEN, "--mdns", *NODE_ARGS],
                    host=bed.hosts[i]))
            for node in nodes:
                await node.wait_ready()
            async with HostClient(bed.hosts[2], "--mdns", "--model", str(model_dir)) as client:
                report = await client.report()
            assert report["token_ids"] == local_tokens(model_dir, PROMPT, 12)
            assert {hop["peer_id"] for hop in report["route"]} == {n.peer_id for n in nodes}
        finally:
            with trio.CancelScope(shield=True):
                for node in nodes:
                    await node.stop()
            readers.cancel_scope.cancel()


async def test_a_host_on_two_networks_is_reached_on_the_one_the_client_shares(netbed, hosts_swarm_factory,
                                                                             checkpoint_factory):
    """Nodes on LAN 0 (their first interface) and LAN 1; the client only on LAN 1. libp2p alone
    dialled each node's first address only, on LAN 0, which the client cannot reach."""
    model_dir = checkpoint_factory("llama")
    bed = netbed(4, lans=[[0, 1], [0, 1], [0, 1], [1]])
    async with hosts_swarm_factory(model_dir, bed, 3) as swarm:
        await swarm.start(swarm.spans(3))
        first_on_lan1 = f"/ip4/{bed.hosts[0].addrs[1]}/tcp/4001/p2p/{swarm.nodes[0].peer_id}"
        async with HostClient(bed.hosts[3], "--bootstrap", first_on_lan1, "--model", str(model_dir)) as client:
            report = await client.report()
    assert report["token_ids"] == local_tokens(model_dir, PROMPT, 12)
    assert [hop["peer_id"] for hop in report["route"]] == [n.peer_id for n in swarm.nodes]


async def test_a_node_whose_address_changes_is_announced_and_found_at_the_new_one(netbed, hosts_swarm_factory,
                                                                                 checkpoint_factory):
    model_dir = checkpoint_factory("llama")
    bed = netbed(3)
    async with hosts_swarm_factory(model_dir, bed, 2) as swarm:
        first, moving = await swarm.start([(0, 3), (3, 6)])
        host = bed.hosts[1]
        for command in (["addr", "del", f"{host.addr}/24", "dev", "eth0"], ["addr", "add", "10.77.0.102/24", "dev", "eth0"],
                        ["route", "replace", "default", "dev", "eth0"]):  # the route went with the address
            with trio.fail_after(30):
                await trio.run_process(["ip", "-n", host.name, *command])
        line = await moving.wait_for("listening on /ip4/10.77.0.102/", timeout=30)  # a laptop that moved networks
        assert line.endswith(moving.peer_id)
        assert not any(l.startswith(f"listening on /ip4/{host.addr}/") for l in moving.lines[moving.lines.index(line):])
        async with HostClient(bed.hosts[2], "--bootstrap", first.addr, "--model", str(model_dir)) as client:
            report = await client.report()
    assert report["token_ids"] == local_tokens(model_dir, PROMPT, 12)
    assert report["route"][1]["peer_id"] == moving.peer_id
