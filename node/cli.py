"""The `hearth` command line: argument parsing and dispatch; each command's work lives elsewhere."""

from __future__ import annotations

import argparse
import sys

from mesh.errors import TransportError
from mesh.pipeline import GenerationFailed
from mesh.routing import NoRouteError
from mesh.session import HopFailed
from node.swarm import NodeStartError
from shard.errors import ShardError
from shard.model_dir import QUANT_CHOICES

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hearth", description="Peer-to-peer LLM inference on household devices.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from node import run_local

    run_local.add_arguments(commands.add_parser(
        "run", help="generate text with a whole model in this process",
        description="Generate with the model split into spans run one after another in this process."))
    from node import api_command, daemon, demo, generate_remote

    demo.add_arguments(commands.add_parser(
        "demo", help="start a local swarm and generate text through it (the main job)",
        description="Start node processes on this machine, each serving part of the model, and stream a "
                    "completion through them. --kill-one kills a node mid-answer to show failover."))

    daemon.add_arguments(commands.add_parser(
        "node", help="serve a span of a model to the swarm",
        description="Load blocks A:B of a model, join the swarm over libp2p and serve inference sessions."))
    generate_remote.add_arguments(commands.add_parser(
        "generate", help="generate text through the swarm",
        description="Find peers, plan a route through them and stream a completion; the prompt stays here."))
    api_command.add_arguments(commands.add_parser(
        "api", help="serve the OpenAI-compatible API over the swarm (no blocks)",
        description="Join the swarm as a client and answer OpenAI-style requests on http://HOST:PORT/v1; "
                    "prompts and tokens stay on this device."))
    from node import relay_command

    relay_command.add_arguments(commands.add_parser(
        "relay", help="relay for households behind NAT (no blocks); also a bootstrap peer",
        description="Join the swarm from a publicly reachable machine, answer peers' reachability checks "
                    "and relay end-to-end encrypted connections to nodes that cannot be dialled directly."))
    swarm = commands.add_parser("swarm", help="start N local nodes splitting a model, until Ctrl-C")
    swarm.add_argument("--model", required=True, metavar="DIR|FILE.gguf")
    swarm.add_argument("--nodes", type=int, default=3, metavar="N")
    swarm.add_argument("--quant", choices=QUANT_CHOICES, default="auto")
    run_local.add_threads_argument(swarm, what=" per node")
    from node import manifest_command

    manifest_command.add_arguments(commands.add_parser(
        "manifest", help="print a model's digest; for a directory, write its hearth-manifest.json",
        description="Hash a model directory's files (whole and in pieces) and write hearth-manifest.json "
                    "beside them, or hash a GGUF file (nothing written); the last line printed is the "
                    "model's digest, its identity in the swarm."))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except (ShardError, NoRouteError, NodeStartError, TransportError, HopFailed, GenerationFailed) as err:
        print(f"hearth {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        from node import run_local

        return run_local.run(args)
    if args.command == "node":
        from node import daemon

        return daemon.run(args)
    if args.command == "generate":
        from node import generate_remote

        return generate_remote.run(args)
    if args.command == "api":
        from node import api_command

        return api_command.run(args)
    if args.command == "demo":
        from node import demo

        return demo.run(args)
    if args.command == "relay":
        from node import relay_command

        return relay_command.run(args)
    if args.command == "swarm":
        return run_swarm(args)
    if args.command == "manifest":
        from node import manifest_command

        return manifest_command.run(args)
    raise AssertionError(f"unhandled command {args.command}")  # argparse only accepts known commands


def run_swarm(args: argparse.Namespace) -> int:
    import trio

    from shard.compute import use_threads

    use_threads(args.threads)  # checks it; the nodes get it
    trio.run(_serve_swarm, args)
    return 0


async def _serve_swarm(args: argparse.Namespace) -> None:
    """`hearth swarm`: the nodes run until a SIGINT (Ctrl-C) or SIGTERM; leaving the swarm stops them."""
    import signal

    import trio

    from node.swarm import LocalSwarm

    async with LocalSwarm(args.model, quant=args.quant, extra_args=["--threads", str(args.threads)]) as swarm:
        await swarm.start(swarm.spans(args.nodes))
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            for node in swarm.nodes:
                print(f"{node.name} pid {node.pid} blocks {node.args[node.args.index('--blocks') + 1]}: {node.addr}",
                      flush=True)
            print(f"bootstrap: {swarm.bootstrap[0]}\nCtrl-C stops every node.", flush=True)
            async for _ in signals:
                break


if __name__ == "__main__":
    sys.exit(main())
