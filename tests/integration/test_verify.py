"""Issue 19 end to end: a `hearth node --chaos corrupt:0.01` among real node processes is caught by
spot checks, banned, and the tokens are an honest run's; a client that trusts only the honest nodes
never reaches it. (100 seeded runs of 64 tokens, honest swarms and throughput:
benchmarks/bench_verify.py.)"""

from __future__ import annotations

from mesh.client import ClientOptions
from mesh.join import connect
from protocol import Codec
from shard.sampling import SamplingParams
from tests.integration.conftest import local_tokens

TOKENS = 24
RUNS = [[5, 17, 33, 2, 9, 71, 4], [60, 61, 3]]  # a fresh client each: bans are a client's own


async def test_a_corrupting_node_is_caught_banned_and_undone_and_a_trusting_client_never_reaches_it(
        local_swarm):
    expected = [local_tokens(local_swarm.model_dir, prompt, TOKENS) for prompt in RUNS]
    honest = await local_swarm.start([(0, 3), (3, 6), (0, 3)])
    liar = await local_swarm.add(3, 6, extra_args=["--chaos", "corrupt:0.01"])
    await liar.wait_ready()
    assert any(line.startswith("CHAOS:") for line in liar.lines)  # said loudly at start

    # a client that trusts only the honest nodes (`--trust-peers FILE`: tests/node/test_client_args.py
    # reads the file): routes and checkers come only from them, so the liar is never asked; a span
    # only one trusted node serves is reported unchecked
    options = ClientOptions(codec=Codec.FP32, verify_rate=0.1, trusted_peers=frozenset(n.peer_id for n in honest))
    async with connect(bootstrap=[liar.addr], model=local_swarm.model_dir, options=options) as client:
        report = await client.generate_text(prompt_ids=RUNS[0], params=SamplingParams(max_new_tokens=TOKENS))
    assert report.token_ids == expected[0]
    assert {hop["peer_id"] for hop in report.route} <= {node.peer_id for node in honest}
    checked = report.verification
    assert checked.banned == [] and checked.disagreements == 0 and checked.checks >= 2
    assert checked.unchecked >= 1  # blocks [3, 6): its only other server is not trusted

    # clients that trust everyone: the liar is caught by a spot check, banned, and its work redone
    for seed, (prompt, tokens) in enumerate(zip(RUNS, expected)):
        options = ClientOptions(codec=Codec.FP32, verify_rate=0.1, seed=seed)
        async with connect(bootstrap=local_swarm.bootstrap, model=local_swarm.model_dir, options=options) as client:
            report = await client.generate_text(prompt_ids=prompt, params=SamplingParams(max_new_tokens=TOKENS))
        assert report.token_ids == tokens
        assert report.verification.banned == [liar.peer_id] and report.verification.checks >= 2
        assert liar.peer_id not in [hop["peer_id"] for hop in report.route]
