"""`hearth api`: the OpenAI-compatible API over the swarm, from a device that serves no blocks.

Joins the swarm as a client (embeddings, LM head and tokenizer from the local model directory, or
fetched from the swarm with `--model-digest`),
serves `node.api` and prints `api listening on http://HOST:PORT/v1` once it answers. SIGINT or
SIGTERM stops it; requests still running are cancelled and their hops closed.
"""

from __future__ import annotations

import argparse
import signal
import time

import trio
from prometheus_client import CollectorRegistry

from node.api import DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_TOKENS, ApiServer, ApiSettings, check_model_dir
from node.client_args import add_client_arguments, check_peer_sources, client_from_args, privacy_line
from node.logs import say, setup_logging
from node.metrics import TimedDiscovery, lookup_histogram
from node.model_fetch import check_digest_arguments
from shard.compute import use_threads
from shard.errors import InvalidInput


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_client_arguments(
        parser, model_help="the model directory (embeddings, LM head, tokenizer and chat template run here)",
        timeout_help="deadline for each request", digest=True, server=True)
    parser.add_argument("--port", type=int, default=8000, metavar="PORT", help="default 8000; 0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1", metavar="HOST",
                        help="address to bind (default 127.0.0.1; any other needs --api-key)")
    parser.add_argument("--api-key", metavar="KEY", help="requests must carry 'Authorization: Bearer KEY'")
    parser.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS, metavar="N",
                        help=f"tokens to generate when a request gives no max_tokens (default {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--max-concurrent", type=int, default=DEFAULT_MAX_CONCURRENT, metavar="N",
                        help=f"generations at once; more get 429 with Retry-After (default {DEFAULT_MAX_CONCURRENT})")


def run(args: argparse.Namespace) -> int:
    check_peer_sources(args)
    check_digest_arguments(args)
    use_threads(args.threads)
    setup_logging(args.verbose, args.log_format)
    settings = ApiSettings(host=args.host, port=args.port, api_key=args.api_key,
                           default_max_tokens=args.default_max_tokens, max_concurrent=args.max_concurrent)
    if args.timeout <= 0:
        raise InvalidInput(f"--timeout must be positive, got {args.timeout}")
    if args.model is not None:
        check_model_dir(args.model)
    trio.run(serve, args, settings)
    return 0


async def serve(args: argparse.Namespace, settings: ApiSettings) -> None:
    async with client_from_args(args) as client:  # with --model-digest: the head fetched from the swarm first
        registry = CollectorRegistry()  # the client's DHT lookups beside the API's metrics, on one /metrics
        client.discovery = TimedDiscovery(client.discovery, lookup_histogram(registry))
        api = ApiServer(client, settings, wall_clock=time.time, registry=registry)
        say(privacy_line(client), "hearth.api")
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                url = await nursery.start(api.run)
                say(f"api listening on {url}", "hearth.api")
                async for signum in signals:
                    say(f"{signal.Signals(signum).name}: stopping", "hearth.api")
                    api.stop()
                    break
    say("stopped", "hearth.api")
