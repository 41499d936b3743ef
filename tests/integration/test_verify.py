"""Issue 19 end to end: a `hearth node --chaos corrupt:0.01` among real node processes is caught by
spot checks, banned, and the tokens are an honest run's. (100 seeded runs of 64 tokens, honest
swarms and throughput: benchmarks/bench_verify.py.)"""

from __future__ import annotations

import json
import sys

import pytest

from mesh.client import ClientOptions
from mesh.join import connect
from protocol import Codec
from shard.sampling import SamplingParams
from tests.integration.conftest import local_tokens, run_command

TOKENS = 24
RUNS = [[5, 17, 33, 2, 9, 71, 4], [60, 61, 3]]  # a fresh client each: bans are a client's own


@pytest.fixture(scope="module")
def expected(checkpoint_factory):
    return [local_tokens(checkpoint_factory("llama"), prompt, TOKENS) for prompt in RUNS]


async def test_a_corrupting_node_is_caught_and_banned_and_the_output_is_honest(local_swarm, expected):
    await local_swarm.start([(0, 3), (3, 6), (0, 3)])
    liar = await local_swarm.add(3, 6, extra_args=["--chaos", "corrupt:0.01"])
    await liar.wait_ready()
    assert any(line.startswith("CHAOS:") for line in liar.lines)  # said loudly at start
    for seed, (prompt, tokens) in enumerate(zip(RUNS, expected)):
        options = ClientOptions(codec=Codec.FP32, verify_rate=0.1, seed=seed)
        async with connect(bootstrap=local_swarm.bootstrap, model=local_swarm.model_dir, options=options) as client:
            report = await client.generate_text(prompt_ids=prompt, params=SamplingParams(max_new_tokens=TOKENS))
        assert report.token_ids == tokens
        assert report.verification.banned == [liar.peer_id] and report.verification.checks >= 2
        assert liar.peer_id not in [hop["peer_id"] for hop in report.route]


async def test_a_client_that_trusts_only_honest_nodes_never_reaches_the_liar(local_swarm, expected, tmp_path):
    """`hearth generate --trust-peers FILE --verify-rate R`: routes and checkers come only from the
    file's peer ids, so the liar off it is never asked; a span only one trusted node serves is
    reported unchecked rather than verified."""
    honest = await local_swarm.start([(0, 3), (3, 6), (0, 3)])
    liar = await local_swarm.add(3, 6, extra_args=["--chaos", "corrupt:0.01"])
    await liar.wait_ready()
    trusted = tmp_path / "trusted.txt"
    trusted.write_text("# our own machines\n" + "".join(f"{node.peer_id}\n" for node in honest))
    done = await run_command([
        sys.executable, "-m", "node.cli", "generate", "--bootstrap", liar.addr, "--model", str(local_swarm.model_dir),
        "--prompt-ids", ",".join(map(str, RUNS[0])), "--max-new-tokens", str(TOKENS), "--codec", "fp32",
        "--local-blocks", "0", "--trust-peers", str(trusted), "--verify-rate", "0.1", "--json"])
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["token_ids"] == expected[0]
    assert {hop["peer_id"] for hop in answer["route"]} <= {node.peer_id for node in honest}
    checked = answer["verification"]
    assert checked["banned"] == [] and checked["disagreements"] == 0 and checked["checks"] >= 2
    assert checked["unchecked"] >= 1  # blocks [3, 6): its only other server is not trusted
