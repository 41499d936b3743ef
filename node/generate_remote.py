"""`hearth generate`: one completion through the swarm, tokens streamed as they arrive."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import trio

from mesh.client import ClientOptions, GenerationReport
from mesh.join import connect
from node.run_local import add_prompt_and_sampling_arguments, add_threads_argument, prompt_arguments, sampling_params
from protocol import Codec
from shard.compute import use_threads
from shard.errors import InvalidInput

CODECS = {codec.name.lower(): codec for codec in Codec}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                        help="a peer of the swarm (with /p2p/ id); repeatable; needed unless --mdns")
    parser.add_argument("--mdns", action="store_true", help="find the nodes on this LAN (no --bootstrap needed)")
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="the model directory (embeddings, LM head and tokenizer run here)")
    add_prompt_and_sampling_arguments(parser)
    parser.add_argument("--codec", choices=sorted(CODECS), default="fp16", help="activations on the wire")
    parser.add_argument("--timeout", type=float, default=300.0, metavar="S", help="deadline for the whole request")
    parser.add_argument("--routing", choices=("latency", "throughput"), default="latency",
                        help="route for the lowest latency (chat) or around busy nodes (batch jobs)")
    add_threads_argument(parser, what=" for the embeddings and LM head")
    parser.add_argument("-v", "--verbose", action="store_true")


def run(args: argparse.Namespace) -> int:
    check_peer_sources(args)
    use_threads(args.threads)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return trio.run(_generate, args)


async def _generate(args: argparse.Namespace) -> int:
    options = ClientOptions(codec=CODECS[args.codec], request_timeout_s=args.timeout, routing=args.routing)
    params = sampling_params(args)
    async with connect(bootstrap=args.bootstrap, model=args.model, options=options, wall_clock=time.time,
                       mdns=args.mdns) as client:
        report = GenerationReport([])
        async for emitted in client.generate(report=report, params=params, **prompt_arguments(args)):
            if not args.json:
                sys.stdout.write(emitted.text if client.tokenizer is not None else f"{emitted.token_id} ")
                sys.stdout.flush()
    if args.json:
        print(json.dumps(report_json(report)))
    else:
        print(f"\n[{len(report.token_ids)} tokens, {report.tokens_per_s:.1f} tokens/s, {report.finish_reason}; "
              f"route {' -> '.join(f'{h.peer_id[-6:]}[{h.start}:{h.end}]' for h in report.hops)}; "
              f"{len(report.recoveries)} recoveries]", file=sys.stderr)
    return 0


def check_peer_sources(args: argparse.Namespace) -> None:
    if not args.bootstrap and not args.mdns:
        raise InvalidInput("give --bootstrap MULTIADDR (a node of the swarm), or --mdns to find the nodes on this LAN")


def report_json(report: GenerationReport) -> dict:
    return {
        "prompt_ids": report.prompt_ids, "token_ids": report.token_ids, "text": report.text,
        "finish_reason": report.finish_reason, "tokens_per_s": round(report.tokens_per_s, 2),
        "route": report.route,
        "hops": [{"peer_id": h.peer_id, "start": h.start, "end": h.end, "compute_s": round(h.compute_s, 4),
                  "round_trip_s": round(h.total_s, 4)} for h in report.hops],
        "recoveries": [r.to_json() for r in report.recoveries],
    }
