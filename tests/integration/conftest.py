"""Fixtures for tests that run real `hearth node` processes over libp2p on 127.0.0.1."""

from __future__ import annotations

import pytest

from node.swarm import LocalSwarm
from shard.generate import generate_local
from shard.pipeline import LocalPipeline
from shard.sampling import SamplingParams

NODE_ARGS = ["--threads", "1", "--idle-timeout", "60"]


@pytest.fixture
def local_swarm(checkpoint_factory, tmp_path):
    """A LocalSwarm of the tiny llama; every process it starts is stopped (then killed) at teardown."""
    swarm = LocalSwarm(checkpoint_factory("llama"), extra_args=NODE_ARGS, work_dir=tmp_path)
    try:
        yield swarm
    finally:
        swarm.stop()
        assert all(node.process.poll() is not None for node in swarm.nodes)


def local_tokens(model_dir, prompt: list[int], n: int) -> list[int]:
    return generate_local(LocalPipeline.load(model_dir), prompt, SamplingParams(max_new_tokens=n)).token_ids


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    """The tiny llama with a tokenizer (byte-fallback BPE) and a chat template: text in, text out."""
    from tests.conftest import save_tiny_checkpoint
    from tests.shard.test_tokenizer import PLAIN_TEMPLATE, sentencepiece_tokenizer, write_model

    backend = sentencepiece_tokenizer()
    path = write_model(tmp_path_factory.mktemp("chat") / "tiny-chat", backend, {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": PLAIN_TEMPLATE})
    return save_tiny_checkpoint(path, "llama", vocab_size=backend.get_vocab_size(), eos_token_id=2)


@pytest.fixture
def netbed():
    """`netbed(hosts, lans=None)` builds a LAN of distinct hosts in network namespaces
    (tools/netbed.py); every process in them is killed and every namespace deleted at teardown,
    whatever the test did."""
    from tools.netbed import NetBed

    reason = NetBed.unavailable()
    if reason:
        pytest.skip(f"no test bed of network namespaces on this machine: {reason}")
    beds = []

    def make(hosts: int, lans: list[list[int]] | None = None) -> NetBed:
        bed = NetBed(hosts, lans=lans).up()
        beds.append(bed)
        return bed

    try:
        yield make
    finally:
        for bed in beds:
            bed.down()


@pytest.fixture
def hosts_swarm_factory(netbed, tmp_path):
    """`factory(model_dir, bed)`: a LocalSwarm whose node i runs on host i of `bed`, listening on
    every interface at port 4001; its nodes are stopped before the test bed goes down."""
    swarms = []

    def make(model_dir, bed, n_hosts: int | None = None) -> LocalSwarm:
        swarm = LocalSwarm(model_dir, extra_args=NODE_ARGS, work_dir=tmp_path, hosts=bed.hosts[:n_hosts])
        swarms.append(swarm)
        return swarm

    try:
        yield make
    finally:
        for swarm in swarms:
            swarm.stop()
