"""Reachability for the commands that accept connections (`hearth node`, `hearth relay`): the
`--relay` flags, and the lines that tell the user how others reach this machine.

The work is `mesh.reachability.ReachKeeper`'s; this module starts it beside the command's other
tasks and prints what it decided: `reachability: private, seen from outside as /ip4/203.0.113.7`
(behind a household router), `reachable through 2 relays`, `relaying for peers behind NAT`. The
relayed addresses themselves come out as `listening on` lines, like every announced address.
"""

from __future__ import annotations

import argparse

import trio

from mesh.reachability import Reachability, ReachKeeper, ReachSettings
from mesh.transport import RelayLimits, Transport
from node.logs import say


def add_relay_arguments(parser: argparse.ArgumentParser) -> None:
    relay = parser.add_mutually_exclusive_group()
    relay.add_argument("--relay", dest="relay", action="store_true", default=None,
                       help="relay for peers behind NAT (default: only when peers can dial this node)")
    relay.add_argument("--no-relay", dest="relay", action="store_false",
                       help="never relay for others, even when reachable")
    parser.add_argument("--relay-slots", type=int, default=RelayLimits.max_reservations, metavar="N",
                        help=f"peers that may hold a slot here at once when relaying (default {RelayLimits.max_reservations})")


def reach_settings_from_args(args: argparse.Namespace) -> ReachSettings:
    if args.relay_slots < 1:
        from shard.errors import InvalidInput

        raise InvalidInput(f"--relay-slots must be at least 1, got {args.relay_slots}")
    return ReachSettings(relay=args.relay, relay_limits=RelayLimits(max_reservations=args.relay_slots))


def describe(keeper: ReachKeeper, transport: Transport) -> str:
    """One line: the verdict, our address as peers see it, the relays we use or offer."""
    parts = [f"reachability: {keeper.reachability.value}"]
    if keeper.observed:
        parts[0] += f", seen from outside as {keeper.observed}"
    if keeper.reachability is Reachability.PRIVATE and not transport.relays():
        parts.append("no relay slot yet: peers outside this network cannot reach this node")
    if transport.relays():
        parts.append(f"reachable through {len(transport.relays())} relays")
    if keeper.relaying:
        parts.append(f"relaying for peers behind NAT (up to {keeper.settings.relay_limits.max_reservations} slots)")
    return "; ".join(parts)


async def keep_reachable(nursery: trio.Nursery, transport: Transport, settings: ReachSettings) -> ReachKeeper:
    """Start a ReachKeeper on `transport` in `nursery`; it prints a line each time its verdict, its
    relay slots or its relaying change."""
    said = [""]

    def report() -> None:
        line = describe(keeper, transport)
        if line != said[0]:
            said[0] = line
            say(line)

    keeper = ReachKeeper(transport, settings, on_change=report)
    await nursery.start(keeper.run)
    return keeper
