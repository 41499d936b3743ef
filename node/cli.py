"""The `hearth` command line: argument parsing and dispatch; each command's work lives elsewhere."""

from __future__ import annotations

import argparse
import sys

from shard.errors import ShardError

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hearth", description="Peer-to-peer LLM inference on household devices.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from node import run_local

    run_local.add_arguments(commands.add_parser(
        "run", help="generate text with a whole model in this process",
        description="Generate with the model split into spans run one after another in this process."))
    manifest = commands.add_parser("manifest", help="write hearth-manifest.json for a model directory")
    manifest.add_argument("model_dir", metavar="DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except ShardError as err:
        print(f"hearth {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        from node import run_local

        return run_local.run(args)
    if args.command == "manifest":
        from shard.manifest import write_manifest

        path = write_manifest(args.model_dir)
        print(f"wrote {path}")
        return 0
    raise AssertionError(f"unhandled command {args.command}")  # argparse only accepts known commands


if __name__ == "__main__":
    sys.exit(main())
