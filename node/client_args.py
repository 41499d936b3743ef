"""What the commands that join the swarm as a client (`hearth generate`, `hearth api`) share:
their flags, and the checks and `ClientOptions` made from them."""

from __future__ import annotations

import argparse
from pathlib import Path

from mesh.client import ClientOptions
from node.logs import add_log_arguments
from node.run_local import add_threads_argument
from protocol import AUTO, Codec
from shard.errors import InvalidInput

CODECS = {AUTO: AUTO, **{codec.name.lower(): codec for codec in Codec}}  # auto: per hop, from the measured link


def add_client_arguments(parser: argparse.ArgumentParser, *, model_help: str, timeout_help: str) -> None:
    """The flags of a client: where the swarm is, the local model directory, wire codec, deadline,
    routing, compute threads and logging."""
    parser.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                        help="a peer of the swarm (with /p2p/ id); repeatable; needed unless --mdns")
    parser.add_argument("--mdns", action="store_true", help="find the nodes on this LAN (no --bootstrap needed)")
    parser.add_argument("--model", required=True, type=Path, metavar="DIR|FILE.gguf", help=model_help)
    parser.add_argument("--codec", choices=sorted(CODECS), default=AUTO,
                        help="activations on the wire (auto: fp16 until a hop's link is measured slow enough "
                             "that a compact codec pays, within the accuracy budget)")
    parser.add_argument("--timeout", type=float, default=300.0, metavar="S", help=timeout_help)
    parser.add_argument("--routing", choices=("latency", "throughput"), default="latency",
                        help="route for the lowest latency (chat) or around busy nodes (batch jobs)")
    add_threads_argument(parser, what=" for the embeddings and LM head")
    add_log_arguments(parser)


def check_peer_sources(args: argparse.Namespace) -> None:
    if not args.bootstrap and not args.mdns:
        raise InvalidInput("give --bootstrap MULTIADDR (a node of the swarm), or --mdns to find the nodes on this LAN")


def client_options(args: argparse.Namespace) -> ClientOptions:
    return ClientOptions(codec=CODECS[args.codec], request_timeout_s=args.timeout, routing=args.routing)
