"""Issue 4 end to end: real node processes over libp2p on loopback, a client given one address."""

from __future__ import annotations

import json
import time
import subprocess
import sys

import pytest
import trio

from mesh.client import ClientOptions
from mesh.data_channel import SealedStream
from mesh.join import connect
from mesh.routing import NoRouteError
from mesh.session import HopSession
from protocol import Codec
from shard.sampling import SamplingParams
from tests.integration.conftest import local_tokens, run_command

PROMPT = [5, 17, 33, 2, 9, 71, 4]


async def generate(bootstrap: str, model_dir, *, codec=Codec.FP32, n=12, prompt=PROMPT):
    async with connect(bootstrap=[bootstrap], model=model_dir, options=ClientOptions(codec=codec)) as client:
        return await client.generate_text(prompt_ids=prompt, params=SamplingParams(max_new_tokens=n))


async def test_three_nodes_equal_hearth_run_exactly(local_swarm, monkeypatch):
    """One swarm of three spans, three ways in: the library (exact, and with the default codec) and
    `hearth generate --json` against `hearth run --json`. Steps take the nodes' data channels (the
    client dials the host it reached each node at over libp2p)."""
    await local_swarm.start(local_swarm.spans(3))
    expected = local_tokens(local_swarm.model_dir, PROMPT, 12)
    step, carried_by = HopSession.step, set()

    async def spying(self, *args, **kwargs):
        carried_by.add(type(self.stream.raw).__name__)
        return await step(self, *args, **kwargs)

    monkeypatch.setattr(HopSession, "step", spying)
    report = await generate(local_swarm.nodes[2].addr, local_swarm.model_dir)
    assert report.token_ids == expected and carried_by == {SealedStream.__name__}
    assert [hop["peer_id"] for hop in report.route] == [node.peer_id for node in local_swarm.nodes]

    report = await generate(local_swarm.nodes[0].addr, local_swarm.model_dir, codec=ClientOptions().codec)
    assert sum(a == b for a, b in zip(report.token_ids, expected)) >= 11  # the default codec: within tolerance

    common = ["--model", str(local_swarm.model_dir), "--prompt-ids", "5,17,33", "--max-new-tokens", "6", "--json"]
    remote = await run_command([sys.executable, "-m", "node.cli", "generate", "--bootstrap", local_swarm.nodes[1].addr,
                                "--codec", "fp32", "--speculative", *common])
    local = await run_command([sys.executable, "-m", "node.cli", "run", *common])
    assert remote.returncode == 0, remote.stderr
    remote_out, local_out = json.loads(remote.stdout), json.loads(local.stdout)
    assert remote_out["token_ids"] == local_out["token_ids"]  # speculating, token for token the same
    assert remote_out["speculation"]["enabled"] and remote_out["speculation"]["passes"] >= 1
    assert remote_out["local_blocks"] == 1  # the command's default (auto): block 0 ran in the client
    assert [hop["start"] for hop in remote_out["route"]] == [1, 2, 4] and remote_out["recoveries"] == []

    # SIGTERM drains each node and it exits by itself (the NAT reachability keeper once kept a
    # drained node alive until the SIGKILL after its grace period)
    for node in local_swarm.nodes:
        assert await node.stop(grace=5.0) == 0
        await node.wait_for_text("stopped", 5.0)


async def test_four_concurrent_clients_each_get_their_own_output_then_the_sync_client_and_connect(local_swarm):
    await local_swarm.start(local_swarm.spans(2))
    prompts = [PROMPT, [8, 8, 8], [100, 3], [40, 41, 42, 43, 44]]
    results = {}

    async def one(i):
        results[i] = (await generate(local_swarm.nodes[i % 2].addr, local_swarm.model_dir, prompt=prompts[i], n=8)).token_ids

    async with trio.open_nursery() as nursery:
        for i in range(len(prompts)):
            nursery.start_soon(one, i)
    for i, prompt in enumerate(prompts):
        assert results[i] == local_tokens(local_swarm.model_dir, prompt, 8)
    await sync_client_and_connect(local_swarm)  # on the same swarm


async def test_raw_libp2p_garbage_gets_error_replies_and_the_node_keeps_serving(local_swarm):
    from mesh.libp2p_transport import Libp2pTransport
    from mesh.transport import INFERENCE_PROTOCOL, MessageStream
    from protocol import Error, ErrorCode, Role

    await local_swarm.start([(0, 6)])
    node = local_swarm.nodes[0]
    async with Libp2pTransport(listen=["/ip4/127.0.0.1/tcp/0"]) as transport:
        peer = await transport.dial(node.addr, timeout=10)
        replies = []
        for garbage in [b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1", (1 << 31).to_bytes(4, "big"), b"\x00\x00\x00\x01\x90"]:
            raw = await transport.open_stream(peer, INFERENCE_PROTOCOL, timeout=10)
            await raw.send_all(garbage)
            replies.append(await MessageStream(raw, Role.CLIENT).receive(timeout=10))
        assert all(isinstance(r, Error) for r in replies)
        assert [r.code for r in replies] == [ErrorCode.MALFORMED_FRAME, ErrorCode.FRAME_TOO_LARGE,
                                             ErrorCode.INVALID_MESSAGE]  # an array where a map belongs
    assert node.running
    report = await generate(node.addr, local_swarm.model_dir, n=4)
    assert report.token_ids == local_tokens(local_swarm.model_dir, PROMPT, 4)


async def test_allow_list_refuses_other_peers(checkpoint_factory, tmp_path):
    from node.swarm import LocalSwarm

    allow = tmp_path / "allow.txt"
    allow.write_text("# only this made-up peer\n12D3KooWNotARealPeerButItDoesNotMatter\n")
    async with LocalSwarm(checkpoint_factory("llama"), extra_args=["--threads", "1", "--allow-peers", str(allow)]) as swarm:
        await swarm.start([(0, 6)])
        options = ClientOptions(codec=Codec.FP32, request_timeout_s=3)
        async with connect(bootstrap=[swarm.nodes[0].addr], model=swarm.model_dir, options=options) as client:
            with pytest.raises(NoRouteError, match="allow-list") as refused:  # refused at the probe, and told why
                await client.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=2))
            assert list(refused.value.refused) == [swarm.nodes[0].peer_id]


async def test_a_household_secret_admits_and_trusts_only_its_own(checkpoint_factory, tmp_path):
    """Two nodes share a secret, a third (faster for a whole route: one hop) does not. A member's
    `hearth generate --swarm-secret` routes only through the two, with the command's local block; a
    client without the secret is refused by both and can only use the outsider; once the outsider
    is gone it is told why there is no route."""
    from node.swarm import LocalSwarm

    secret = tmp_path / "household.secret"
    secret.write_text("correct horse battery staple 42\n")
    household = ["--swarm-secret", str(secret)]
    async with LocalSwarm(checkpoint_factory("llama"), extra_args=["--threads", "1"]) as swarm:
        first = await swarm.add(0, 3, extra_args=household)
        await first.wait_ready(60)
        second, outsider = await swarm.add(3, 6, extra_args=household), await swarm.add(0, 6)
        await second.wait_ready(60)
        await outsider.wait_ready(60)
        member = await run_command([
            sys.executable, "-m", "node.cli", "generate", "--bootstrap", first.addr, "--model", str(swarm.model_dir),
            "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "6", "--codec", "fp32", "--json",
            *household])
        assert member.returncode == 0, member.stderr
        answer = json.loads(member.stdout)
        assert answer["token_ids"] == local_tokens(swarm.model_dir, PROMPT, 6) and answer["local_blocks"] == 1
        assert [hop["peer_id"] for hop in answer["route"]] == [first.peer_id, second.peer_id]
        options = ClientOptions(codec=Codec.FP32, request_timeout_s=3)
        async with connect(bootstrap=[outsider.addr], model=swarm.model_dir, options=options) as stranger:
            report = await stranger.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=6))
            assert [hop["peer_id"] for hop in report.route] == [outsider.peer_id]
            await outsider.stop()
            with pytest.raises(NoRouteError, match="proof of this swarm's secret") as refused:
                await stranger.generate_text(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=2))
            assert set(refused.value.refused) == {first.peer_id, second.peer_id}


async def sync_client_and_connect(local_swarm) -> None:
    """`mesh.SyncClient` for plain Python and `mesh.connect` for async code, on a started swarm."""
    import mesh

    def plain_python():  # in a thread of its own, as code that is not async runs it
        with mesh.SyncClient(bootstrap=[local_swarm.nodes[0].addr], model=local_swarm.model_dir,
                             options=mesh.ClientOptions(codec=Codec.FP32)) as client:
            streamed = [token.token_id for token in client.generate(prompt_ids=PROMPT, max_new_tokens=6)]
            report = client.generate_text(prompt_ids=PROMPT, max_new_tokens=6)
            partial = client.generate(prompt_ids=PROMPT, max_new_tokens=6)
            first = next(partial)
            partial.close()  # abandoning a stream frees its sessions
        return streamed, report, first

    streamed, report, first = await trio.to_thread.run_sync(plain_python)
    assert streamed == report.token_ids == local_tokens(local_swarm.model_dir, PROMPT, 6)
    assert first.token_id == streamed[0]

    # the documented async entry point, on the same swarm
    async with mesh.connect(bootstrap=[local_swarm.nodes[1].addr], model=local_swarm.model_dir,
                            options=mesh.ClientOptions(codec=Codec.FP32)) as client:
        tokens = [t.token_id async for t in client.generate(prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=5))]
    assert tokens == streamed[:5]


def test_generate_with_an_unreachable_bootstrap_fails_fast_with_one_line(checkpoint_factory):
    dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "node.cli", "generate", "--bootstrap", dead, "--model",
                           str(checkpoint_factory("llama")), "--prompt-ids", "1,2"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "no bootstrap or cached peer answered" in done.stderr
    assert "Traceback" not in done.stderr and time.monotonic() - started < 30
