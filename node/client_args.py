"""What the commands that join the swarm as a client (`hearth generate`, `hearth api`) share:
their flags, and the checks and `ClientOptions` made from them. The privacy flags (local blocks,
trusted peers, the swarm secret) serve `hearth node --api-port` and `hearth demo` too."""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from mesh.client import Client, ClientOptions
from mesh.join import connect, joined
from mesh.first_blocks import AUTO_BLOCKS
from mesh.speculative import DEFAULT_MAX_DRAFTS, MAX_DRAFTS
from mesh.verify import CROSS_KERNEL_TOLERANCE, DEFAULT_TOLERANCE
from node.logs import add_log_arguments
from node.model_fetch import fetch_client_model
from node.run_local import add_threads_argument
from node.trust_files import read_peer_ids, read_swarm_secret
from protocol import AUTO, Codec
from shard.errors import InvalidInput

CODECS = {AUTO: AUTO, **{codec.name.lower(): codec for codec in Codec}}  # auto: per hop, from the measured link
DEFAULT_KEEP_SESSIONS_S = 120.0  # the API keeps a finished answer's route this long for the next turn


def add_client_arguments(parser: argparse.ArgumentParser, *, model_help: str, timeout_help: str,
                         digest: bool = False, server: bool = False) -> None:
    """The flags of a client: where the swarm is, the local model directory (or with `digest`, the
    model's digest to fetch it by), wire codec, deadline, routing, speculation (on by default for a
    `server`: the API), compute threads and logging."""
    parser.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                        help="a peer of the swarm (with /p2p/ id); repeatable; needed unless --mdns")
    parser.add_argument("--mdns", action="store_true", help="find the nodes on this LAN (no --bootstrap needed)")
    if digest:
        model = parser.add_mutually_exclusive_group(required=True)
        model.add_argument("--model", type=Path, metavar="DIR|FILE.gguf", help=model_help)
        model.add_argument("--model-digest", metavar="HEX",
                           help="no files here: fetch what this client runs (embeddings, LM head, tokenizer, its "
                                "first block) from the peers that hold the model, by its digest (`hearth manifest`)")
        parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                            help="with --model-digest: where the fetched pieces go (default ~/.cache/hearth/DIGEST)")
    else:
        parser.add_argument("--model", required=True, type=Path, metavar="DIR|FILE.gguf", help=model_help)
    parser.add_argument("--codec", choices=sorted(CODECS), default=AUTO,
                        help="activations on the wire (auto: fp16 until a hop's link is measured slow enough "
                             "that a compact codec pays, within the accuracy budget)")
    parser.add_argument("--timeout", type=float, default=300.0, metavar="S", help=timeout_help)
    parser.add_argument("--routing", choices=("latency", "throughput"), default="latency",
                        help="route for the lowest latency (chat) or around busy nodes (batch jobs)")
    add_privacy_arguments(parser)
    add_speculation_arguments(parser, server=server)
    add_threads_argument(parser, what=" for the embeddings and LM head")
    add_log_arguments(parser)


def add_local_blocks_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--local-blocks", metavar="K|auto",
                        help="run the model's first K blocks on this device, so no peer receives token "
                             "embeddings (which give the prompt away); auto, the default: 1 when this device "
                             "has memory for it; 0: off. Hidden states after K blocks still reveal much of "
                             "the prompt to a determined node: see docs/security.md")


def add_verify_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verify-rate", type=float, default=0.0, metavar="R",
                        help="spot checks: after this share of steps (and the first and last) a second node with the "
                             "same blocks recomputes each hop's latest steps; a peer caught lying is banned and its "
                             "work redone; tokens are shown once checked (0, the default: off; 0.1 costs a second "
                             "computation of every hop on a spare node)")
    parser.add_argument("--verify-tolerance", type=float, default=DEFAULT_TOLERANCE, metavar="T",
                        help=f"spot checks: how far (relative RMS per token row) a hop's answer may be from a "
                             f"checker's with the same kernels (default {DEFAULT_TOLERANCE:g}: they compute "
                             f"bit-identical results; between different kernels at least {CROSS_KERNEL_TOLERANCE:g}; "
                             f"docs/security.md)")


def add_speculation_arguments(parser: argparse.ArgumentParser, *, server: bool) -> None:
    """--speculative, --max-drafts and (for a `server`, the API) --keep-sessions; a server speculates
    and keeps routes by default: neither changes an answer."""
    parser.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=server,
                        help="speculative decoding: tokens guessed from the prompt and the answer so far "
                             "(prompt lookup) are checked several at a time in one pass through the route; "
                             "the answer is the same, fewer passes where it repeats its prompt "
                             f"(default: {'on' if server else 'off'})")
    parser.add_argument("--draft-model", type=Path, metavar="DIR|FILE.gguf",
                        help="speculation's drafts from this small model on this device, which must share the "
                             "model's tokenizer (implies --speculative; default: prompt lookup)")
    parser.add_argument("--max-drafts", type=int, default=DEFAULT_MAX_DRAFTS, metavar="N",
                        help=f"speculation: at most N guessed tokens per pass, 1-{MAX_DRAFTS} (default "
                             f"{DEFAULT_MAX_DRAFTS}; fewer are sent where they are seldom kept)")
    if server:
        parser.add_argument("--keep-sessions", type=float, default=DEFAULT_KEEP_SESSIONS_S, metavar="S",
                            help="prefix reuse: keep a finished answer's route open S seconds, so the next turn "
                                 "of the conversation prefills only its new tokens (the nodes' idle sessions; "
                                 f"default {DEFAULT_KEEP_SESSIONS_S:g}; 0: off)")


def speculation_options(args: argparse.Namespace) -> dict:
    """`ClientOptions` fields from --speculative, --max-drafts and --keep-sessions."""
    if not 1 <= args.max_drafts <= MAX_DRAFTS:
        raise InvalidInput(f"--max-drafts must be in [1, {MAX_DRAFTS}], got {args.max_drafts}")
    keep = getattr(args, "keep_sessions", 0.0)
    if not keep >= 0:
        raise InvalidInput(f"--keep-sessions must be >= 0 seconds (0: off), got {keep}")
    draft = getattr(args, "draft_model", None)
    if draft is not None and not draft.exists():
        raise InvalidInput(f"--draft-model {draft}: no such file or directory")
    return dict(speculative=args.speculative or draft is not None, max_drafts=args.max_drafts, draft_model=draft,
                keep_sessions_s=keep)


def parse_verify_rate(rate: float) -> float:
    if not 0 <= rate <= 1:
        raise InvalidInput(f"--verify-rate must be in [0, 1] (0: off), got {rate}")
    return rate


def verify_options(args: argparse.Namespace) -> dict:
    """`ClientOptions` fields from --verify-rate and --verify-tolerance."""
    if not args.verify_tolerance > 0:
        raise InvalidInput(f"--verify-tolerance must be positive, got {args.verify_tolerance}")
    return dict(verify_rate=parse_verify_rate(args.verify_rate), verify_tolerance=args.verify_tolerance)


def add_privacy_arguments(parser: argparse.ArgumentParser, *, node: bool = False) -> None:
    """--local-blocks, --trust-peers, --verify-rate and (for a client) --swarm-secret: what stays on
    this device, which nodes receive hidden states and how their answers are checked. A node
    (`hearth node`) has its own --swarm-secret; these serve its API's client."""
    add_local_blocks_argument(parser)
    add_verify_argument(parser)
    parser.add_argument("--trust-peers", type=Path, metavar="FILE",
                        help=("the API's client " if node else "") + "routes only through these node peer ids "
                             "(one per line, # comments, as --allow-peers)")
    if not node:
        parser.add_argument("--swarm-secret", type=Path, metavar="FILE",
                            help="household mode: route only through nodes proving they hold the secret in FILE "
                                 "(at least 16 bytes, e.g. head -c 32 /dev/urandom | base64 > FILE); the nodes "
                                 "serve only peers proving it too")


def parse_local_blocks(text: str | None) -> int | str:
    """--local-blocks: a block count or "auto" (also when not given)."""
    if text is None or text == AUTO_BLOCKS:
        return AUTO_BLOCKS
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise InvalidInput(f"--local-blocks must be a block count (0: off) or {AUTO_BLOCKS!r}, got {text!r}")
    return count


def privacy_line(client: Client) -> str:
    """What a client keeps here and whom it trusts, for the API's log at start."""
    local = client.local_blocks
    parts = [f"blocks [0, {local}) run here: no peer receives token embeddings" if local else
             "no block runs here: the first hop receives token embeddings (--local-blocks)"]
    if client.options.trusted_peers is not None:
        parts.append(f"routes only through {len(client.options.trusted_peers)} trusted peers")
    if client.options.swarm_secret is not None:
        parts.append("household mode: only nodes proving the swarm secret")
    if client.options.verify_rate:
        parts.append(f"spot checks after {client.options.verify_rate:g} of steps")
    return "; ".join(parts)


def privacy_options(args: argparse.Namespace) -> dict:
    """`ClientOptions` fields from the privacy and verification flags."""
    trusted = None
    if args.trust_peers is not None:
        trusted = read_peer_ids(args.trust_peers, flag="--trust-peers")
        if not trusted:
            raise InvalidInput(f"--trust-peers file {args.trust_peers} lists no peer id: no node could be used")
    secret = getattr(args, "swarm_secret", None)
    return dict(local_blocks=parse_local_blocks(args.local_blocks), trusted_peers=trusted,
                swarm_secret=read_swarm_secret(secret) if secret is not None else None, **verify_options(args))


def check_peer_sources(args: argparse.Namespace) -> None:
    if not args.bootstrap and not args.mdns:
        raise InvalidInput("give --bootstrap MULTIADDR (a node of the swarm), or --mdns to find the nodes on this LAN")


def client_options(args: argparse.Namespace) -> ClientOptions:
    return ClientOptions(codec=CODECS[args.codec], request_timeout_s=args.timeout, routing=args.routing,
                         **privacy_options(args), **speculation_options(args))


@contextlib.asynccontextmanager
async def client_from_args(args: argparse.Namespace) -> AsyncIterator[Client]:
    """A client of the model in --model, or fetched by --model-digest from the swarm it joins."""
    options = client_options(args)
    if args.model is not None:
        async with connect(bootstrap=args.bootstrap, model=args.model, options=options, wall_clock=time.time,
                           mdns=args.mdns) as client:
            yield settled(client)
        return
    listen = ("/ip4/0.0.0.0/tcp/0",) if args.mdns else ("/ip4/127.0.0.1/tcp/0",)
    async with joined(bootstrap=args.bootstrap, listen=listen, enable_mdns=args.mdns, wall_clock=time.time,
                      require_peers=bool(args.bootstrap)) as (transport, discovery):
        model = await fetch_client_model(transport, discovery, args.model_digest, options, root=args.cache_dir)
        yield settled(await trio.to_thread.run_sync(lambda: Client(transport, discovery, model, options=options)))


def settled(client: Client) -> Client:
    """The client, with what start-up built (head, tokenizer, libp2p) moved out of the cyclic
    collector's way, as the node daemon does: a full collection mid-answer scanned it all (0.17-0.2 s
    in bench_swarm, landing between two tokens)."""
    gc.collect()
    gc.freeze()
    return client
