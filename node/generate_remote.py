"""`hearth generate`: one completion through the swarm, tokens streamed as they arrive."""

from __future__ import annotations

import argparse
import json
import sys

import trio

from mesh.client import GenerationReport
from node.client_args import add_client_arguments, check_peer_sources, client_from_args
from node.logs import setup_logging
from node.model_fetch import check_digest_arguments
from node.run_local import add_prompt_and_sampling_arguments, prompt_arguments, sampling_params
from shard.compute import use_threads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_client_arguments(parser, model_help="the model directory (embeddings, LM head and tokenizer run here)",
                         timeout_help="deadline for the whole request", digest=True)
    add_prompt_and_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    check_peer_sources(args)
    check_digest_arguments(args)
    use_threads(args.threads)
    setup_logging(args.verbose, args.log_format)
    return trio.run(_generate, args)


async def _generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    async with client_from_args(args) as client:
        report = GenerationReport([])
        async for emitted in client.generate(report=report, params=params, **prompt_arguments(args)):
            if not args.json:
                sys.stdout.write(emitted.text if client.tokenizer is not None else f"{emitted.token_id} ")
                sys.stdout.flush()
    if args.json:
        print(json.dumps(report_json(report)))
    else:
        print(f"\n[{len(report.token_ids)} tokens, {report.tokens_per_s:.1f} tokens/s, {report.finish_reason}; "
              f"route {report.route_text()}; "
              f"{len(report.recoveries)} recoveries"
              f"{'; ' + report.verification.text() if report.verification.rate else ''}"
              f"{'; ' + report.speculation.summary() if report.speculation.enabled else ''}]", file=sys.stderr)
    return 0


def report_json(report: GenerationReport) -> dict:
    return {
        "prompt_ids": report.prompt_ids, "token_ids": report.token_ids, "text": report.text,
        "finish_reason": report.finish_reason, "tokens_per_s": round(report.tokens_per_s, 2),
        "route": report.route, "local_blocks": report.local_blocks,
        "hops": [{"peer_id": h.peer_id, "start": h.start, "end": h.end, "compute_s": round(h.compute_s, 4),
                  "round_trip_s": round(h.total_s, 4), "path": h.path, "relay": h.relay} for h in report.hops],
        "recoveries": [r.to_json() for r in report.recoveries],
        "verification": report.verification.to_json(),
        "speculation": report.speculation.to_json(),
    }
