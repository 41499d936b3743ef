"""Wall time per token on the simulator's token path: one client, two in-memory nodes, virtual time.

What a simulated token costs, without the swarm around it: the real `mesh.Client` and two real
`node.Node`s (blocks [0, 20) and [20, 40) of the simulator's 40-block stand-in model) over the
in-memory transport under `mesh.virtual_time.VirtualClock`, greedy requests of 32-token prompts,
every answer checked against the failure-free reference. Prints the wall microseconds per
generated token of each repeat and their minimum (this machine is shared: the minimum is the
figure least disturbed by others).

    python benchmarks/bench_token_path.py [--tokens 100] [--requests 60] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.client import Client, ClientOptions  # noqa: E402
from mesh.discovery import MemoryDirectory  # noqa: E402
from mesh.memory_transport import MemoryNetwork, MemoryTransport  # noqa: E402
from mesh.virtual_time import VirtualClock  # noqa: E402
from node.node import Node  # noqa: E402
from node.sessions import SessionLimits  # noqa: E402
from protocol import Codec  # noqa: E402
from shard.sampling import SamplingParams  # noqa: E402
from simulations.compute import step_seconds  # noqa: E402
from simulations.model import StandInModel  # noqa: E402
from simulations.runner import rare_collections  # noqa: E402
from simulations.scenario import DeviceProfile, ModelShape  # noqa: E402

SPANS = ((0, 20), (20, 40))


async def serve(model: StandInModel, network: MemoryNetwork, directory: MemoryDirectory, name: str,
                start: int, end: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    device = DeviceProfile()
    async with MemoryTransport.open(network, name) as transport:
        node = Node(model.span(device, start, end), model.model_id, model.digest,
                    limits=SessionLimits(compute_in_thread=False), wall_clock=trio.current_time,
                    token_seconds=step_seconds(device, end - start, 1))
        await node.run(transport, directory, task_status=task_status)


async def measure(model: StandInModel, tokens: int, requests: int) -> float:
    """Wall microseconds per generated token."""
    network, directory = MemoryNetwork(), MemoryDirectory(trio.current_time)
    async with trio.open_nursery() as nursery:
        for index, (start, end) in enumerate(SPANS):
            await nursery.start(serve, model, network, directory, f"node{index}", start, end)
        async with MemoryTransport.open(network, "user") as transport:
            client = Client(transport, directory, model.model_dir, options=ClientOptions(codec=Codec.FP32),
                            head=model.head, tokenizer=None)
            started = time.perf_counter()
            for request in range(requests):
                prompt = [(request * 7 + j) % model.shape.vocab for j in range(32)]
                report = await client.generate_text(prompt_ids=prompt, params=SamplingParams(max_new_tokens=tokens))
                if report.token_ids != model.reference(prompt, tokens):
                    raise SystemExit(f"request {request}: tokens differ from the failure-free reference")
            wall = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    return 1e6 * wall / (tokens * requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100, help="new tokens per request")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir, rare_collections():
        model = StandInModel(ModelShape(), Path(workdir))
        figures = [trio.run(measure, model, args.tokens, args.requests, clock=VirtualClock())
                   for _ in range(args.repeat)]
    print(f"{args.tokens * args.requests} tokens x {args.repeat}: "
          + ", ".join(f"{us:.0f}" for us in figures) + f" us per token; min {min(figures):.0f} us")


if __name__ == "__main__":
    main()
