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
