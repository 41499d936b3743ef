"""`hearth node` without --blocks: real processes choose their spans from what the swarm serves."""

from __future__ import annotations

import subprocess
import sys

from shard.config import load_config
from shard.span import block_bytes
from tests.integration.conftest import local_tokens
from tests.integration.test_swarm import PROMPT, generate

KV_BYTES = 1_000_000


def memory_for(model_dir, blocks: int) -> str:
    """A --memory budget holding `blocks` blocks of the tiny llama besides the KV-cache budget."""
    return str(KV_BYTES + blocks * block_bytes(load_config(model_dir)) + 1000)


async def chosen(node) -> tuple[int, int]:
    line = await node.wait_for("chose blocks ", timeout=5)
    start, end = line.split()[2].split(":")
    return int(start), int(end)


async def test_two_nodes_without_blocks_cover_the_model_between_them(local_swarm):
    model_dir = local_swarm.model_dir
    memory = ["--memory", memory_for(model_dir, 3), "--kv-cache-bytes", str(KV_BYTES)]
    first = await local_swarm.add(None, None, extra_args=memory)
    await first.wait_ready()
    second = await local_swarm.add(None, None, extra_args=memory)
    await second.wait_ready()
    spans = {await chosen(first), await chosen(second)}
    assert spans == {(0, 3), (3, 6)}  # the first takes either end at random; the second the other half
    report = await generate(second.addr, model_dir)
    assert report.token_ids == local_tokens(model_dir, PROMPT, 12)


def test_a_memory_budget_too_small_for_one_block_is_a_clear_error(checkpoint_factory):
    model_dir = checkpoint_factory("llama")
    result = subprocess.run([sys.executable, "-m", "node.cli", "node", "--model", str(model_dir), "--memory", "1M",
                             "--kv-cache-bytes", str(KV_BYTES)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "listening on" not in result.stdout
    assert "hold no block of this model: one block takes 172544 bytes" in result.stderr, result.stderr


def test_memory_is_for_nodes_choosing_their_blocks(checkpoint_factory):
    model_dir = checkpoint_factory("llama")
    result = subprocess.run([sys.executable, "-m", "node.cli", "node", "--model", str(model_dir), "--blocks", "0:3",
                             "--memory", "6G"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "--memory and --no-rebalance are for a node choosing its own blocks" in result.stderr
