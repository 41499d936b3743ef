"""`hearth run`: one generation in this process, with the model split into spans like a swarm's."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trio

from node.model_fetch import check_digest_arguments, fetch_whole_model
from shard.compute import describe, use_threads
from shard.errors import InvalidInput
from shard.generate import Emitted, generate_local
from shard.pipeline import LocalPipeline
from shard.model_dir import QUANT_CHOICES, OpenModel, open_model_dir
from shard.quant import INT4_GROUP_SIZES
from shard.sampling import SamplingParams
from shard.tokenizer import TOKENIZER_FILE, Tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", metavar="DIR|FILE.gguf", help="a Hugging Face model directory or a GGUF file")
    model.add_argument("--model-digest", metavar="HEX",
                       help="fetch the whole model from the peers that hold it first (with --bootstrap), by its digest")
    parser.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                        help="with --model-digest: a peer of the swarm that holds the model")
    parser.add_argument("--cache-dir", metavar="DIR", help="with --model-digest: where the pieces go")
    parser.add_argument("--quant", choices=QUANT_CHOICES, default="auto",
                        help="weight quantization of the blocks (auto: as the model has them)")
    parser.add_argument("--group-size", type=int, choices=INT4_GROUP_SIZES, default=32, metavar="N",
                        help="int4 weights in groups of N (64: 4.5 bits per weight, as llama.cpp's Q4_0; 32: 5 bits, as Q4_1)")
    parser.add_argument("--split", type=int, default=1, metavar="K", help="run the blocks as K spans")
    add_threads_argument(parser)
    add_prompt_and_sampling_arguments(parser)


def add_threads_argument(parser: argparse.ArgumentParser, default: int = 0, what: str = "") -> None:
    parser.add_argument("--threads", type=int, default=default, metavar="N",
                        help=f"compute threads{what} (0: one per core; default {default})")


def add_prompt_and_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT")
    prompt.add_argument("--prompt-ids", metavar="1,2,3", help="token ids, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P")
    parser.add_argument("--seed", type=int, default=None, metavar="S")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def prompt_arguments(args: argparse.Namespace) -> dict:
    """The prompt as `Client.generate` keywords: text or ids."""
    if args.prompt_ids is not None:
        return {"prompt_ids": parse_ids(args.prompt_ids)}
    return {"prompt": args.prompt}


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise InvalidInput(f"--prompt-ids must be comma-separated integers, got {text!r}") from err
    if not ids:
        raise InvalidInput("--prompt-ids is empty")
    return ids


def run(args: argparse.Namespace) -> int:
    use_threads(args.threads)
    params = sampling_params(args)
    model = open_model_dir(args.model) if args.model is not None else _fetched(args)
    tokenizer = model.tokenizer()
    prompt_ids = _prompt_ids(args, tokenizer)
    pipeline = LocalPipeline.load(model, parts=args.split, quant=args.quant, group_size=args.group_size)
    on_token = None if args.json else _streamer(tokenizer)
    result = generate_local(pipeline, prompt_ids, params, tokenizer=tokenizer, on_token=on_token)
    if args.json:
        print(json.dumps({"prompt_ids": result.prompt_ids, "token_ids": result.token_ids, "text": result.text,
                          "finish_reason": result.finish_reason, "tokens_per_s": round(result.tokens_per_s, 2)}))
    else:
        print(f"\n[{len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tokens/s, {result.finish_reason}; {describe()}]",
              file=sys.stderr)
    return 0


def _fetched(args: argparse.Namespace) -> OpenModel:
    """The whole model `--model-digest` names, fetched from the swarm into its cache (`node.model_fetch`)."""
    check_digest_arguments(args)
    if not args.bootstrap:
        raise InvalidInput("--model-digest needs a peer that holds the model: give --bootstrap MULTIADDR")
    return trio.run(fetch_whole_model, args.bootstrap, args.model_digest, Path(args.cache_dir) if args.cache_dir else None)


def _prompt_ids(args: argparse.Namespace, tokenizer: Tokenizer | None) -> list[int]:
    if args.prompt_ids is not None:
        return parse_ids(args.prompt_ids)
    if tokenizer is None:
        raise InvalidInput(f"--prompt needs {TOKENIZER_FILE} in {args.model or 'the model'}; pass --prompt-ids instead")
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise InvalidInput("the prompt encodes to no tokens")
    return ids


def _streamer(tokenizer: Tokenizer | None):
    def on_token(emitted: Emitted) -> None:
        sys.stdout.write(emitted.text if tokenizer is not None else f"{emitted.token_id} ")
        sys.stdout.flush()

    return on_token
