"""A client for tests that run on a host of the test bed (tests/integration/test_hosts.py).

The test process stays in this machine's own network, so the client it drives runs here, inside a
host's namespace: `python -m tests.integration.host_client --bootstrap ADDR --model DIR ...`. It
prints one JSON object per line: with `--pause-at N`, `{"event": "pause", "peer_id": ..., "relay": ...}`
just before it sends its N-th step to the hop that ends at the last block (and the relay that hop
runs through, or null), then waits for a line on
stdin (the test kills that node meanwhile); at the end `{"event": "report", ...}` with the tokens,
the route and the recoveries.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import trio

from mesh.client import ClientOptions
from mesh.join import connect
from mesh.session import HopSession
from node.generate_remote import report_json
from protocol import Codec
from shard.config import load_config
from shard.sampling import SamplingParams


def say(**event) -> None:
    print(json.dumps(event), flush=True)


def pause_before(step: int, last_block: int) -> None:
    original, paused = HopSession.step, []

    async def step_or_pause(self, hidden, position, **kwargs):
        if not paused and self.step_number == step and self.end == last_block:
            paused.append(self.peer_id)
            say(event="pause", peer_id=self.peer_id, relay=self.relay)  # the relay it runs through, if any
            await trio.to_thread.run_sync(sys.stdin.readline)
        return await original(self, hidden, position, **kwargs)

    HopSession.step = step_or_pause


async def main(args: argparse.Namespace) -> None:
    if args.pause_at is not None:
        pause_before(args.pause_at, load_config(args.model).num_layers)
    options = ClientOptions(codec=Codec.FP32, request_timeout_s=args.timeout)
    prompt = [int(t) for t in args.prompt_ids.split(",")]
    async with connect(bootstrap=args.bootstrap, model=args.model, options=options, wall_clock=time.time,
                       mdns=args.mdns) as client:
        report = await client.generate_text(prompt_ids=prompt, params=SamplingParams(max_new_tokens=args.tokens))
    say(event="report", **report_json(report))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt-ids", required=True)
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--pause-at", type=int)
    parser.add_argument("--mdns", action="store_true")
    parser.add_argument("--timeout", type=float, default=60.0)
    trio.run(main, parser.parse_args())
