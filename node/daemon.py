"""`hearth node`: load a span, join the swarm over libp2p, serve and announce until signalled.

Prints `listening on <multiaddr>/p2p/<id>` once it serves. SIGINT or SIGTERM withdraws the
announcement and ends open sessions with an error telling their clients to go elsewhere.

Without `--blocks` the node chooses its span: it joins first, reads what the swarm serves, and
takes as many blocks as its memory budget holds (`--memory`, or the memory available now, less the
KV-cache budget) where the swarm is weakest (`mesh.balance`); then it keeps re-evaluating and
moves when that raises the swarm's bottleneck enough (`node.rebalance`; `--no-rebalance` stays put).

With `--api-port` the node also answers the OpenAI-compatible API (`node.api`), the chat and swarm
pages and `/metrics`, through a client of its own, joined through its own libp2p host; a loopback
wraps that host so the client can use the node's own span too. It prints `api listening on
http://HOST:PORT/v1` before `listening on`. `--metrics-port` serves `/metrics` alone (prints
`metrics listening on http://HOST:PORT/metrics`); with both, each serves the same metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import random
import re
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import trio

from mesh.balance import choose_span, max_blocks_for
from mesh.client import Client, ClientOptions
from mesh.reachability import ReachSettings
from mesh.first_blocks import AUTO_BLOCKS
from mesh.swarm_secret import SwarmSecret
from mesh.data_channel import DataChannels
from mesh.join import joined
from mesh.libp2p_transport import Libp2pTransport
from mesh.loopback import LoopbackTransport
from node.api import DEFAULT_MAX_CONCURRENT, ApiServer, ApiSettings, check_model_dir
from node.chaos import Chaos, ChaosSpec, parse_chaos
from node.client_args import (
    add_privacy_arguments, add_speculation_arguments, privacy_line, privacy_options, speculation_options,
)
from node.logs import add_log_arguments, say, setup_logging
from node.metrics import NodeMetrics, TimedDiscovery
from node.model_fetch import FetchedModel, print_progress
from node.piece_server import UploadLimits
from node.reach import add_relay_arguments, keep_reachable, reach_settings_from_args
from node.metrics_http import serve_metrics
from node.node import Node, measure_token_seconds
from node.rebalance import BalanceSettings, served_from
from node.run_local import add_threads_argument
from node.sessions import SessionLimits
from node.trust_files import read_peer_ids
from shard.compute import available_memory, describe, use_threads
from shard.config import ModelConfig
from shard.errors import InvalidInput
from shard.model_dir import QUANT_CHOICES, OpenModel, open_model_dir, resolve_quant
from shard.piece_store import WholeModel
from shard.quant import INT4_GROUP_SIZES
from shard.span import block_bytes, load_span

log = logging.getLogger("hearth.node")

DIGEST = re.compile(r"[0-9a-f]{64}")  # a model digest, as `hearth manifest` prints it
ADDRESS_POLL_S = 2.0  # how often the daemon looks for changed host addresses


@dataclass(frozen=True)
class NodeSettings:
    model_dir: Path | None  # None: fetched from peers by `model_digest`
    start: int | None  # None: choose the span from what the swarm serves
    end: int | None
    quant: str = "auto"  # "auto": as the model's own weights are (a GGUF file's types; a directory's floats)
    group_size: int = 32  # int4 only
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    bootstrap: tuple[str, ...] = ()
    identity: Path | None = None
    peer_cache: Path | None = None
    mdns: bool = False
    limits: SessionLimits = SessionLimits()
    allowed_peers: frozenset[str] | None = None
    swarm_secret: SwarmSecret | None = None  # household mode: serve only peers proving it (mesh.swarm_secret)
    api_client: ClientOptions = ClientOptions(local_blocks=AUTO_BLOCKS)  # the API's own client
    api: ApiSettings | None = None  # serve the OpenAI-compatible API too
    data_channel: bool = True  # offer clients a sealed TCP channel for their steps (mesh.data_channel)
    memory_bytes: int | None = None  # budget for weights + KV cache when choosing a span; None: available now
    rebalance: bool = True  # a node that chose its span moves it when the swarm needs (node.rebalance)
    rebalance_every_s: float = 120.0
    metrics: tuple[str, int] | None = None  # (host, port) to serve /metrics on
    chaos: ChaosSpec | None = None  # faults on purpose (`--chaos`, node.chaos); only ever from the flag
    model_digest: str | None = None  # --model-digest: the model's files come from peers (node.model_fetch)
    cache_dir: Path | None = None  # where fetched pieces go (default ~/.cache/hearth/DIGEST)
    upload: UploadLimits = UploadLimits()  # serving the model's pieces to peers fetching it
    reach: ReachSettings = ReachSettings()  # behind NAT: relay slots; reachable: relaying for others (node.reach)

    @property
    def auto_span(self) -> bool:
        return self.start is None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", metavar="DIR|FILE.gguf", help="a Hugging Face model directory or a GGUF file")
    model.add_argument("--model-digest", metavar="HEX",
                       help="no files here: fetch the model (only the pieces this node needs) from the peers that "
                            "hold it, by the digest `hearth manifest` prints; needs --bootstrap or --mdns")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="with --model-digest: where the fetched pieces go (default ~/.cache/hearth/DIGEST)")
    parser.add_argument("--max-upload", type=float, default=UploadLimits.bytes_per_second / 2**20, metavar="MiB/S",
                        help="pieces of the model sent to peers fetching it, MiB per second in all (default "
                             f"{UploadLimits.bytes_per_second / 2**20:g}; inference traffic is never limited)")
    parser.add_argument("--blocks", metavar="A:B",
                        help="serve blocks A (inclusive) to B (exclusive); default: choose where the swarm is weakest")
    parser.add_argument("--memory", type=parse_bytes, metavar="BYTES",
                        help="without --blocks: memory for weights and KV cache, e.g. 6G (default: available now)")
    parser.add_argument("--no-rebalance", action="store_true",
                        help="without --blocks: keep the span chosen at start instead of moving where needed")
    parser.add_argument("--rebalance-every", type=float, default=120.0, metavar="S",
                        help="how often a node that chose its span re-evaluates it (randomised +-50%%)")
    parser.add_argument("--quant", choices=QUANT_CHOICES, default="auto",
                        help="weights of the blocks (auto: as the model has them; a GGUF file's 4-bit types run as int4, "
                             "its 5- to 8-bit ones as int8; a directory's floats stay floats)")
    parser.add_argument("--group-size", type=int, choices=INT4_GROUP_SIZES, default=32, metavar="N",
                        help="int4 weights in groups of N (64: 4.5 bits per weight, as llama.cpp's Q4_0; 32: 5 bits, as Q4_1)")
    parser.add_argument("--listen", action="append", metavar="MULTIADDR",
                        help="address to listen on (default /ip4/0.0.0.0/tcp/0: every interface, a free port; "
                             "give a port, e.g. /ip4/0.0.0.0/tcp/4001, for an address that outlives restarts); "
                             "repeatable")
    parser.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                        help="a peer to join through (with /p2p/ id); repeatable")
    parser.add_argument("--identity", type=Path, metavar="PATH", help="ed25519 key file (created if missing)")
    parser.add_argument("--peer-cache", type=Path, metavar="PATH", help="where to remember peers for rejoining")
    parser.add_argument("--mdns", action="store_true", help="find peers on the LAN")
    add_relay_arguments(parser)
    parser.add_argument("--max-sessions", type=int, default=16, metavar="N")
    parser.add_argument("--max-sessions-per-peer", type=int, default=8, metavar="N",
                        help="sessions one peer may hold at once (default 8; an API server holds one per user)")
    parser.add_argument("--max-prefill-tokens-per-minute", type=int, metavar="N",
                        help="prompt tokens one peer may have computed a minute (rewinds and replays count, "
                             "decoding does not); past it the peer is told to go elsewhere "
                             "(default 8 x --max-length, 32768: eight whole contexts; 0: unlimited)")
    parser.add_argument("--kv-cache-bytes", type=int, default=1 << 30, metavar="N")
    parser.add_argument("--max-length", type=int, default=4096, metavar="N", help="positions per session")
    parser.add_argument("--idle-timeout", type=float, default=300.0, metavar="S")
    parser.add_argument("--allow-peers", type=Path, metavar="FILE", help="only these peer ids (one per line) may open sessions")
    add_threads_argument(parser)
    parser.add_argument("--api-port", type=int, metavar="PORT",
                        help="also serve the OpenAI-compatible API on this port (0: any free port)")
    parser.add_argument("--api-host", default="127.0.0.1", metavar="HOST",
                        help="address the API binds (default 127.0.0.1; any other needs --api-key)")
    parser.add_argument("--api-key", metavar="KEY", help="API requests must carry 'Authorization: Bearer KEY'")
    parser.add_argument("--api-max-concurrent", type=int, default=DEFAULT_MAX_CONCURRENT, metavar="N",
                        help=f"API generations at once; more get 429 with Retry-After (default {DEFAULT_MAX_CONCURRENT})")
    parser.add_argument("--no-data-channel", action="store_true",
                        help="steps only over libp2p (by default clients may step over a sealed TCP channel "
                             "on the --listen host, which is about 4 ms per hop faster)")
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="serve Prometheus metrics on http://HOST:PORT/metrics (0: any free port)")
    parser.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                        help="address the metrics endpoint binds (default 127.0.0.1; metrics carry no text, "
                             "only counts, peer ids and blocks)")
    parser.add_argument("--chaos", metavar="FAULT",
                        help="FOR TESTS AND DEMOS ONLY: misbehave on purpose, as a lying or sick node would: "
                             "corrupt:REL (noise of relative size REL on every output), corrupt-sometimes:REL:P "
                             "(on each output with probability P) or stall:SECONDS (every step late)")
    parser.add_argument("--chaos-seed", type=int, default=0, metavar="N", help="seed of --chaos's noise (default 0)")
    parser.add_argument("--swarm-secret", type=Path, metavar="FILE",
                        help="household mode: serve only peers proving they hold the secret in FILE (at least 16 "
                             "bytes, e.g. head -c 32 /dev/urandom | base64 > FILE), prove it to them, and route "
                             "the API's requests only through nodes proving it")
    add_privacy_arguments(parser, node=True)
    add_speculation_arguments(parser, server=True)
    add_log_arguments(parser)


def settings_from_args(args: argparse.Namespace) -> NodeSettings:
    start, end = parse_blocks(args.blocks) if args.blocks else (None, None)
    if args.blocks and (args.memory is not None or args.no_rebalance):
        raise InvalidInput("--memory and --no-rebalance are for a node choosing its own blocks (no --blocks)")
    if args.rebalance_every <= 0:
        raise InvalidInput(f"--rebalance-every must be positive, got {args.rebalance_every}")
    for name in ("max_sessions", "max_sessions_per_peer", "kv_cache_bytes", "max_length"):
        if getattr(args, name) <= 0:
            raise InvalidInput(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    limits = SessionLimits(max_sessions=args.max_sessions, max_sessions_per_peer=args.max_sessions_per_peer,
                           kv_cache_bytes=args.kv_cache_bytes,
                           max_length=args.max_length, idle_timeout_s=args.idle_timeout,
                           max_prefill_tokens_per_minute=prefill_budget_from_args(args))
    if args.model_digest is not None and not DIGEST.fullmatch(args.model_digest):
        raise InvalidInput(f"--model-digest must be the 64 hex digits `hearth manifest` prints, got {args.model_digest!r}")
    if args.model_digest is not None and not args.bootstrap and not args.mdns:
        raise InvalidInput("--model-digest needs peers to fetch from: give --bootstrap MULTIADDR or --mdns")
    if args.cache_dir is not None and args.model_digest is None:
        raise InvalidInput("--cache-dir is for --model-digest")
    if not args.max_upload > 0:
        raise InvalidInput(f"--max-upload must be positive, got {args.max_upload}")
    return NodeSettings(
        model_dir=Path(args.model) if args.model is not None else None, model_digest=args.model_digest,
        cache_dir=args.cache_dir, upload=UploadLimits(bytes_per_second=args.max_upload * 2**20),
        start=start, end=end, quant=args.quant, group_size=args.group_size,
        listen=tuple(args.listen or NodeSettings.listen), bootstrap=tuple(args.bootstrap),
        identity=args.identity, peer_cache=args.peer_cache, mdns=args.mdns, limits=limits,
        allowed_peers=read_allow_list(args.allow_peers) if args.allow_peers else None,
        api=api_settings_from_args(args), data_channel=not args.no_data_channel, memory_bytes=args.memory,
        rebalance=not args.no_rebalance, rebalance_every_s=args.rebalance_every,
        metrics=metrics_bind_from_args(args), chaos=chaos_from_args(args), reach=reach_settings_from_args(args),
        **household_from_args(args))


def household_from_args(args: argparse.Namespace) -> dict:
    """--swarm-secret for the node and its API's client; --local-blocks, --trust-peers and --verify-rate
    for that client."""
    if args.api_port is None and (args.local_blocks is not None or args.trust_peers is not None or args.verify_rate):
        raise InvalidInput("--local-blocks, --trust-peers and --verify-rate are for the API's client: "
                           "they need --api-port")
    client = privacy_options(args)  # the node's --swarm-secret is its API client's too
    return dict(swarm_secret=client["swarm_secret"], api_client=ClientOptions(**client, **speculation_options(args)))


def chaos_from_args(args: argparse.Namespace) -> ChaosSpec | None:
    if args.chaos is None:
        if args.chaos_seed != 0:
            raise InvalidInput("--chaos-seed needs --chaos")
        return None
    return parse_chaos(args.chaos, args.chaos_seed)


def prefill_budget_from_args(args: argparse.Namespace) -> int:
    """--max-prefill-tokens-per-minute: 8 whole contexts by default; 0 (unlimited) or at least one."""
    budget = args.max_prefill_tokens_per_minute
    if budget is None:
        return 8 * args.max_length
    if budget != 0 and budget < args.max_length:
        raise InvalidInput(f"--max-prefill-tokens-per-minute must be 0 (unlimited) or at least --max-length "
                           f"{args.max_length}, so one whole prompt fits, got {budget}")
    return budget


def metrics_bind_from_args(args: argparse.Namespace) -> tuple[str, int] | None:
    if args.metrics_port is None:
        if args.metrics_host != "127.0.0.1":
            raise InvalidInput("--metrics-host needs --metrics-port")
        return None
    if not 0 <= args.metrics_port <= 65535:
        raise InvalidInput(f"--metrics-port must be in 0..65535, got {args.metrics_port}")
    return args.metrics_host, args.metrics_port


def api_settings_from_args(args: argparse.Namespace) -> ApiSettings | None:
    if args.api_port is None:
        if args.api_key is not None or args.api_host != "127.0.0.1":
            raise InvalidInput("--api-host and --api-key need --api-port")
        return None
    return ApiSettings(host=args.api_host, port=args.api_port, api_key=args.api_key,
                       max_concurrent=args.api_max_concurrent)


def data_channels(listen: tuple[str, ...], announced: list[str]) -> DataChannels | None:
    """The data channel listener on the first --listen IP address; a wildcard address binds every
    interface and offers an address libp2p announced, loopback only if nothing else. None without
    an IP address."""
    for addr in listen:
        parts = addr.split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            host = parts[2]
            if host not in ("0.0.0.0", "::"):
                return DataChannels(host)
            specific = [bits[2] for bits in (other.split("/") for other in announced)
                        if len(bits) > 2 and bits[1] == parts[1] and bits[2] not in ("0.0.0.0", "::")]
            specific.sort(key=lambda ip: ip.startswith("127.") or ip == "::1")  # reachable from elsewhere first
            if specific:
                return DataChannels(host, advertise_host=specific[0])
    return None


def parse_blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError as err:
        raise InvalidInput(f"--blocks must look like A:B (e.g. 0:8), got {text!r}") from err
    return start, end


def parse_bytes(text: str) -> int:
    """`6G`, `512M`, `1.5G` or a plain byte count."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = (text[:-1], units[text[-1].upper()]) if text[-1:].upper() in units else (text, 1)
    try:
        value = int(float(number) * unit)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 6G, 512M or 1000000, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the size must be positive, got {text!r}")
    return value


def span_capacity(settings: NodeSettings, config: ModelConfig) -> int:
    """How many blocks of the model this node's memory holds; InvalidInput when not even one fits."""
    n_blocks = config.num_layers
    per_block = block_bytes(config, settings.quant, settings.group_size)
    memory = settings.memory_bytes if settings.memory_bytes is not None else available_memory()
    blocks = max_blocks_for(memory, per_block, n_blocks=n_blocks, reserve_bytes=settings.limits.kv_cache_bytes)
    if blocks < 1:
        raise InvalidInput(f"{memory} bytes of memory hold no block of this model: one block takes {per_block} "
                           f"bytes ({settings.quant}) besides the {settings.limits.kv_cache_bytes}-byte KV-cache "
                           f"budget; give more --memory, a smaller --kv-cache-bytes or --quant int4")
    return blocks


def read_allow_list(path: Path) -> frozenset[str]:
    return read_peer_ids(path, flag="--allow-peers")


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose, args.log_format)
    settings = settings_from_args(args)
    use_threads(args.threads)
    model = None  # with --model-digest: fetched in `serve`, once joined
    if settings.model_dir is not None:
        model = open_model_dir(settings.model_dir)  # bad config or span: a clear error before any network
        settings = checked_for_model(settings, model)
        if settings.api is not None:
            check_model_dir(settings.model_dir)
    if settings.chaos is not None:
        warn_chaos(settings.chaos)
    trio.run(serve, settings, model)
    return 0


def checked_for_model(settings: NodeSettings, model: OpenModel) -> NodeSettings:
    """`settings` with the quantization resolved for `model`; InvalidInput for a span it lacks."""
    quant, group_size = resolve_quant(model, settings.quant, settings.group_size)
    settings = dataclasses.replace(settings, quant=quant, group_size=group_size)
    config = model.config
    if settings.auto_span:
        span_capacity(settings, config)
    elif not 0 <= settings.start < settings.end <= config.num_layers:
        raise InvalidInput(f"--blocks {settings.start}:{settings.end} is outside the model's {config.num_layers} blocks")
    return settings


def warn_chaos(spec: ChaosSpec) -> None:
    """Say loudly, at start, that this node misbehaves on purpose: in its log and on its console."""
    text = (f"CHAOS: this node misbehaves on purpose (--chaos {spec.kind}): {spec.describe()}; "
            f"for tests and demos only, never in a swarm whose answers matter")
    log.warning(text)
    say(text)


async def load(settings: NodeSettings, model: OpenModel, start: int, end: int):
    say(f"loading blocks {start}:{end} of {model.path} ({settings.quant}; {describe()})")
    return await trio.to_thread.run_sync(lambda: load_span(model, start, end, quant=settings.quant,
                                                           group_size=settings.group_size))


async def choose_blocks(settings: NodeSettings, discovery, digest: str, n_blocks: int, max_blocks: int,
                        rng: random.Random) -> tuple[int, int]:
    """The window of `max_blocks` blocks where the swarm is weakest, from what discovery says now."""
    records = []
    with trio.move_on_after(15.0):  # a node alone (or whose bootstrap is slow) starts at the front
        records = await discovery.lookup(digest)
    start, end = choose_span(served_from(records, digest), n_blocks, max_blocks, rng=rng)
    say(f"chose blocks {start}:{end} of {n_blocks} ({max_blocks} fit in memory; {len(records)} peers serve this model)")
    return start, end


async def serve(settings: NodeSettings, model: OpenModel | None) -> None:
    rng = random.Random()  # span choice ties and rebalancing times: spread nodes, never in step
    metrics = NodeMetrics()
    async with joined(bootstrap=settings.bootstrap, listen=settings.listen, identity_path=settings.identity,
                      peer_cache_path=settings.peer_cache, enable_mdns=settings.mdns,
                      wall_clock=time.time) as (host, discovery), \
            (LoopbackTransport.wrap(host) if settings.api else nullcontext(host)) as transport:
        discovery = TimedDiscovery(discovery, metrics.lookup_seconds)
        fetched = None
        if model is None:
            say(f"fetching the manifest of model {settings.model_digest} from peers")
            fetched = await FetchedModel.open(transport, discovery, settings.model_digest, root=settings.cache_dir,
                                              swarm=settings.swarm_secret, on_progress=print_progress("the model's headers"))
            model = fetched.model()
            settings = checked_for_model(settings, model)
        n_blocks = model.config.num_layers
        digest = await trio.to_thread.run_sync(lambda: model.digest)
        say(f"model digest {digest}")
        start, end, balance = settings.start, settings.end, None
        if settings.auto_span:
            max_blocks = span_capacity(settings, model.config)
            start, end = await choose_blocks(settings, discovery, digest, n_blocks, max_blocks, rng)

        async def load_blocks(a: int, b: int):
            if fetched is not None:  # the span's pieces first (a rebalanced node's new blocks too)
                fetched.fetcher.on_progress = print_progress(f"blocks {a}:{b}")
                await fetched.ensure(a, b)
                done = fetched.last
                say(f"blocks {a}:{b}: fetched {done.fetched} bytes from peers, {done.done - done.fetched} were here "
                    f"({len(fetched.fetcher.banned)} peers banned for bad pieces)")
            return await load(settings, model, a, b)

        if fetched is not None and settings.api is not None:  # the API's client: the head and its first block
            fetched.fetcher.on_progress = print_progress("the client's head")
            await fetched.ensure(0, 1 if settings.api_client.local_blocks != 0 else 0, head=True)
        span = await load_blocks(start, end)
        token_seconds = await trio.to_thread.run_sync(measure_token_seconds, span)
        if settings.auto_span and settings.rebalance:
            balance = BalanceSettings(n_blocks, max_blocks, token_seconds / (end - start),
                                      every_s=settings.rebalance_every_s)
        channels = data_channels(settings.listen, transport.addrs) if settings.data_channel else None
        node = Node(span, model.name, digest, limits=settings.limits,
                    allowed_peers=settings.allowed_peers, wall_clock=time.time, token_seconds=token_seconds,
                    data_channels=channels, balance=balance, seed=rng.random(),
                    load_span=load_blocks if balance else None, metrics=metrics,
                    chaos=Chaos(settings.chaos) if settings.chaos is not None else None,
                    swarm_secret=settings.swarm_secret, upload=settings.upload,
                    pieces=fetched.cache if fetched is not None else await trio.to_thread.run_sync(WholeModel.of, model))
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(node.run, transport, discovery)
                # What start-up built (model, libp2p, DHT) lives as long as the node: out of the cyclic
                # collector's way, a full collection during a step scans only what serving allocates
                # (in bench_swarm one took 0.1-0.25 s per node, landing in a step now and then).
                gc.collect()
                gc.freeze()
                say(f"announced blocks {start}:{end} ({1 / token_seconds:.0f} tokens/s through the span)")
                api = await start_api(nursery, settings, model, transport, discovery, metrics) if settings.api else None
                stop_metrics = trio.Event()
                if settings.metrics is not None:
                    url = await nursery.start(serve_metrics, metrics.registry, *settings.metrics, stop_metrics.wait)
                    say(f"metrics listening on {url}")
                for addr in transport.addrs:
                    say(f"listening on {addr}")
                watch = trio.CancelScope()  # what follows the network, until the node drains
                await nursery.start(watch_network, host, node, settings.reach, watch)
                async for signum in signals:
                    say(f"{signal.Signals(signum).name}: draining")
                    watch.cancel()
                    stop_metrics.set()
                    if api is not None:
                        api.stop()
                    node.stop()
                    break
    say("stopped")


async def watch_network(transport: Libp2pTransport, node: Node, reach: ReachSettings, scope: trio.CancelScope,
                        *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Until `scope` is cancelled (the node drains): keep the node reachable (NAT: relay slots,
    announced as they come) and follow its addresses. Both stop with the scope, so a drained node
    exits (before, the reachability keeper outlived SIGTERM until a SIGKILL)."""
    with scope:
        async with trio.open_nursery() as nursery:
            await keep_reachable(nursery, transport, reach)
            task_status.started()
            await follow_addresses(transport, node)


async def follow_addresses(transport: Libp2pTransport, node: Node, poll_s: float = ADDRESS_POLL_S) -> None:
    """Re-announce at once when the host's addresses change (a laptop moving between networks, a
    DHCP renewal): print the new `listening on` lines, tell connected peers (identify push) and
    publish the record with the new addresses instead of waiting for the next refresh."""
    announced = transport.addrs
    while True:
        await trio.sleep(poll_s)
        addrs = transport.addrs
        if addrs == announced:
            continue
        announced = addrs
        await transport.push_addrs()
        await node.announce_now()  # before saying so: a `listening on` line is an address peers can find
        say(f"addresses changed: {len(addrs)} now")
        for addr in addrs:
            say(f"listening on {addr}")


async def start_api(nursery: trio.Nursery, settings: NodeSettings, model: OpenModel, transport, discovery,
                    metrics: NodeMetrics) -> ApiServer:
    """The OpenAI-compatible API over a client of this node's own model, joined through its host;
    its metrics join the node's."""
    client = await trio.to_thread.run_sync(lambda: Client(transport, discovery, model, options=settings.api_client))
    api = ApiServer(client, settings.api, wall_clock=time.time, registry=metrics.registry)
    say(f"api: {privacy_line(client)}")
    url = await nursery.start(api.run)
    say(f"api listening on {url}")
    return api
