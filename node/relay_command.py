"""`hearth relay`: a publicly reachable machine that helps households behind NAT, serving no blocks.

It joins the swarm (Kademlia DHT in server mode, so it can also be the bootstrap address others
give), answers peers' dial-back checks (`mesh.reachability.DialBack`) and relays for peers that
cannot be dialled directly, within `--relay-slots` and `mesh.transport.RelayLimits`' household
defaults. What it relays is end-to-end encrypted between the two peers (Noise over the relayed
stream); it sees only who talks to whom, when, and how much. Prints `relaying for peers behind NAT`
and then `listening on <multiaddr>/p2p/<id>` for each address; SIGINT or SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

import trio

from mesh.join import joined
from node.logs import add_log_arguments, say, setup_logging
from node.reach import keep_reachable, reach_settings_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", action="append", metavar="MULTIADDR",
                        help="address to listen on (default /ip4/0.0.0.0/tcp/4001); repeatable")
    parser.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                        help="a peer already in the swarm (none: this relay is the first)")
    parser.add_argument("--identity", type=Path, metavar="PATH",
                        help="ed25519 key file (created if missing): keeps this relay's peer id across restarts")
    parser.add_argument("--relay-slots", type=int, default=16, metavar="N",
                        help="peers that may hold a slot here at once (default 16)")
    add_log_arguments(parser)


def run(args: argparse.Namespace) -> int:
    args.relay = True
    settings = reach_settings_from_args(args)
    setup_logging(args.verbose, args.log_format)
    trio.run(serve, args, settings)
    return 0


async def serve(args: argparse.Namespace, settings) -> None:
    listen = tuple(args.listen or ("/ip4/0.0.0.0/tcp/4001",))
    async with joined(bootstrap=args.bootstrap, listen=listen, identity_path=args.identity,
                      wall_clock=time.time) as (transport, _discovery):
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await keep_reachable(nursery, transport, settings)  # prints that it relays
                for addr in transport.addrs:
                    say(f"listening on {addr}", "hearth.relay")
                async for signum in signals:
                    say(f"{signal.Signals(signum).name}: stopping", "hearth.relay")
                    nursery.cancel_scope.cancel()
                    break
    say("stopped", "hearth.relay")
