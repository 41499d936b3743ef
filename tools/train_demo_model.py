"""Train the demo model that ships in `node/demo_model/`: a small Llama on the Python stdlib's source.

Reproducible: python `random`, numpy and torch are seeded, files are read in sorted order, and the
windows of step k come from a numpy generator seeded with (seed, k), so a resumed run sees the same
batches as an uninterrupted one. Runs on one CPU thread (`torch.set_num_threads(1)`, and the
tokenizer's Rayon pool limited to one thread) so a shared machine keeps its other cores.

Steps: select the corpus (tools/demo_corpus.py) -> train a byte-level BPE tokenizer on the training
files -> encode them into one token stream -> train LlamaForCausalLM with AdamW and a cosine
schedule, checkpointing to --work-dir -> export a Hugging Face model directory plus its model card
and `hearth-manifest.json`.

    .venv/bin/python tools/train_demo_model.py                 # full run (~22 min on one core)
    .venv/bin/python tools/train_demo_model.py --measure 20    # time 20 steps in fp32 and bf16
    .venv/bin/python tools/train_demo_model.py --resume        # continue from --work-dir
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before `tokenizers` starts its thread pool
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_corpus  # noqa: E402  (tools/ is not a package)

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 1234
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768  # a multiple of 128, so int4 works with every group size
    num_layers: int = 6  # 2 blocks per node in the 3-node demo
    num_heads: int = 4
    num_kv_heads: int = 2
    seq_len: int = 512  # = max_position_embeddings: every position is trained
    batch_size: int = 8
    steps: int = 1200
    peak_lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: str = "bf16"  # "bf16" autocast or "fp32"; see benchmarks/RESULTS.md for the measurement
    checkpoint_every: int = 100


# ---------------------------------------------------------------- data


def train_tokenizer(files: list[demo_corpus.SourceFile], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization): every string round-trips, no unknown token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[demo_corpus.END_OF_TEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator((f.text for f in files), trainer=trainer, length=len(files))
    return tokenizer


def encode_files(tokenizer: Tokenizer, files: list[demo_corpus.SourceFile]) -> np.ndarray:
    """All files as one uint16 stream, each followed by <|endoftext|>."""
    ids: list[int] = []
    for file in files:
        ids.extend(tokenizer.encode(demo_corpus.document_text(file)).ids)
    return np.asarray(ids, dtype=np.uint16)


def prepare_data(settings: TrainSettings, work_dir: Path) -> tuple[Tokenizer, np.ndarray, np.ndarray]:
    """Tokenizer, train stream and held-out stream; cached in `work_dir` after the first run."""
    tokenizer_path, train_path, eval_path = (work_dir / n for n in ("tokenizer.json", "train.npy", "eval.npy"))
    stamp_path = work_dir / "data.json"
    stamp = {"vocab_size": settings.vocab_size, "python": demo_corpus.python_version()}
    cached = tokenizer_path.exists() and train_path.exists() and eval_path.exists() and stamp_path.exists()
    if cached and json.loads(stamp_path.read_text()) == stamp:
        print(f"data: reusing {work_dir}", flush=True)
        return Tokenizer.from_file(str(tokenizer_path)), np.load(train_path), np.load(eval_path)
    started = time.perf_counter()
    train_files, held_out = demo_corpus.split_files(demo_corpus.corpus_files())
    print(f"corpus: {len(train_files)} train files, {len(held_out)} held out "
          f"({sum(len(f.text) for f in train_files) / 1e6:.1f}M chars of training text)", flush=True)
    tokenizer = train_tokenizer(train_files, settings.vocab_size)
    train_ids, eval_ids = encode_files(tokenizer, train_files), encode_files(tokenizer, held_out)
    print(f"tokenizer: vocab {tokenizer.get_vocab_size()}, {len(train_ids):,} train tokens, "
          f"{len(eval_ids):,} held-out tokens ({time.perf_counter() - started:.0f} s)", flush=True)
    tokenizer.save(str(tokenizer_path))
    np.save(train_path, train_ids)
    np.save(eval_path, eval_ids)
    stamp_path.write_text(json.dumps(stamp) + "\n")
    return tokenizer, train_ids, eval_ids


def batch_for_step(stream: np.ndarray, step: int, settings: TrainSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows for `step`, the same on every run: inputs and next-token targets [B, T]."""
    rng = np.random.default_rng([settings.seed, step])
    starts = rng.integers(0, len(stream) - settings.seq_len - 1, size=settings.batch_size)
    windows = np.stack([stream[s : s + settings.seq_len + 1] for s in starts]).astype(np.int64)
    windows = torch.from_numpy(windows)
    return windows[:, :-1], windows[:, 1:]


# ---------------------------------------------------------------- model and optimizer


def model_config(settings: TrainSettings, eot_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=settings.vocab_size, hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size, num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads, num_key_value_heads=settings.num_kv_heads,
        max_position_embeddings=settings.seq_len, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=None,
    )


def build_model(settings: TrainSettings, eot_id: int):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(model_config(settings, eot_id))
    model.config.architectures = ["LlamaForCausalLM"]
    return model


def build_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.peak_lr, betas=(0.9, 0.95), eps=1e-8)


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * peak at the last step."""
    if step < settings.warmup_steps:
        return settings.peak_lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    floor = settings.peak_lr * settings.min_lr_ratio
    return floor + (settings.peak_lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step(model, optimizer, inputs, targets, settings: TrainSettings, precision: str) -> float:
    # inputs, targets: [B, T]
    with autocast(precision):
        logits = model(input_ids=inputs).logits  # [B, T, V]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()
    return loss.detach().item()


@torch.no_grad()
def held_out_loss(model, stream: np.ndarray, settings: TrainSettings, windows: int = 6) -> float:
    """Mean loss over the first `windows` non-overlapping windows of the held-out stream."""
    model.eval()
    losses = []
    for i in range(windows):
        chunk = torch.from_numpy(stream[i * settings.seq_len : (i + 1) * settings.seq_len + 1].astype(np.int64))
        with autocast(settings.precision):
            logits = model(input_ids=chunk[None, :-1]).logits
        losses.append(float(F.cross_entropy(logits.float()[0], chunk[1:])))
    model.train()
    return sum(losses) / len(losses)


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, model, optimizer, step: int, elapsed: float) -> None:
    from shard.atomic_file import atomic_write

    with atomic_write(path) as file:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "elapsed": elapsed}, file)


def load_checkpoint(path: Path, model, optimizer) -> tuple[int, float]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], state["elapsed"]


# ---------------------------------------------------------------- training


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(settings: TrainSettings, work_dir: Path, resume: bool) -> tuple[torch.nn.Module, Tokenizer, dict]:
    tokenizer, train_ids, eval_ids = prepare_data(settings, work_dir)
    eot_id = tokenizer.token_to_id(demo_corpus.END_OF_TEXT)
    seed_everything(settings.seed)
    model = build_model(settings, eot_id)
    optimizer = build_optimizer(model, settings)
    checkpoint = work_dir / "checkpoint.pt"
    step, elapsed = load_checkpoint(checkpoint, model, optimizer) if resume and checkpoint.exists() else (0, 0.0)
    print(f"model: {count_parameters(model):,} parameters; training steps {step}..{settings.steps} "
          f"of {settings.batch_size}x{settings.seq_len} tokens, {settings.precision}", flush=True)
    model.train()
    window_start, window_tokens, losses = time.perf_counter(), 0, []
    while step < settings.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        inputs, targets = batch_for_step(train_ids, step, settings)
        losses.append(train_step(model, optimizer, inputs, targets, settings, settings.precision))
        step += 1
        window_tokens += inputs.numel()
        if step % 10 == 0 or step == settings.steps:
            now = time.perf_counter()
            elapsed += now - window_start
            print(f"step {step:5d}  loss {sum(losses) / len(losses):.3f}  lr {learning_rate(step - 1, settings):.2e}  "
                  f"{window_tokens / (now - window_start):,.0f} tok/s  {elapsed / 60:.1f} min", flush=True)
            window_start, window_tokens, losses = now, 0, []
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            save_checkpoint(checkpoint, model, optimizer, step, elapsed)
            print(f"  checkpoint at step {step}; held-out loss {held_out_loss(model, eval_ids, settings):.3f}", flush=True)
            window_start = time.perf_counter()
    stats = {"train_minutes": round(elapsed / 60, 1), "steps": settings.steps,
             "held_out_loss": round(held_out_loss(model, eval_ids, settings), 3),
             "tokens_seen": settings.steps * settings.batch_size * settings.seq_len,
             "train_tokens": int(len(train_ids)), "held_out_tokens": int(len(eval_ids))}
    return model, tokenizer, stats


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def measure(settings: TrainSettings, work_dir: Path, steps: int) -> None:
    """Tokens/s of `steps` training steps in fp32 and in bf16 autocast (after 3 warm-up steps)."""
    tokenizer, train_ids, _ = prepare_data(settings, work_dir)
    eot_id = tokenizer.token_to_id(demo_corpus.END_OF_TEXT)
    for precision in ("fp32", "bf16"):
        seed_everything(settings.seed)
        model = build_model(settings, eot_id)
        optimizer = build_optimizer(model, settings)
        for step in range(3 + steps):
            if step == 3:
                started = time.perf_counter()
            inputs, targets = batch_for_step(train_ids, step, settings)
            loss = train_step(model, optimizer, inputs, targets, settings, precision)
        seconds = time.perf_counter() - started
        tokens = steps * settings.batch_size * settings.seq_len
        print(f"{precision}: {tokens / seconds:,.0f} tok/s ({seconds / steps:.2f} s/step, "
              f"{count_parameters(model):,} params, last loss {loss:.3f})", flush=True)


# ---------------------------------------------------------------- export

EXPORTED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "README.md", "hearth-manifest.json")
SIZE_LIMIT_BYTES = 20 * 10**6
# Not instruction-tuned: the template turns a chat into a code prompt. A system message becomes a
# comment block, user text is the code to continue, assistant turns end with <|endoftext|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% for line in message['content'].split('\\n') %}# {{ line }}\n{% endfor %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
)


def tokenizer_config(settings: TrainSettings) -> dict:
    eot = demo_corpus.END_OF_TEXT
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": settings.seq_len,
        "bos_token": eot, "eos_token": eot, "unk_token": None, "pad_token": None,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def export(model, tokenizer: Tokenizer, settings: TrainSettings, stats: dict, out: Path, work_dir: Path) -> None:
    """Write the model directory to `work_dir/export`, then move it into place at `out`."""
    from shard.manifest import write_manifest

    staging = work_dir / "export"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.generation_config.update(bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id,
                                   pad_token_id=model.config.eos_token_id, do_sample=False)
    model.save_pretrained(staging, safe_serialization=True)
    if weights_bytes(staging) > SIZE_LIMIT_BYTES * 0.95:  # leave room for the tokenizer
        print("fp32 weights do not fit the size limit; saving bf16", flush=True)
        model.to(torch.bfloat16).save_pretrained(staging, safe_serialization=True)
    tokenizer.save(str(staging / "tokenizer.json"))
    (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(settings), indent=2) + "\n")
    (staging / "README.md").write_text(model_card(model, settings, stats))
    write_manifest(staging)
    unexpected = sorted(set(p.name for p in staging.iterdir()) - set(EXPORTED_FILES))
    if unexpected:
        raise RuntimeError(f"export wrote files it should not have: {unexpected}")
    replace_directory(staging, out)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"exported {out} ({size / 1e6:.2f} MB)", flush=True)
    if size > SIZE_LIMIT_BYTES:
        raise RuntimeError(f"{out} is {size} bytes, over the {SIZE_LIMIT_BYTES}-byte limit")


def weights_bytes(directory: Path) -> int:
    return (directory / "model.safetensors").stat().st_size


def replace_directory(staging: Path, out: Path) -> None:
    """Move the export to `out`, replacing a previous export (and nothing else)."""
    if out.exists():
        stray = sorted(p.name for p in out.iterdir() if p.name not in EXPORTED_FILES)
        if stray:
            raise RuntimeError(f"{out} holds files this tool did not write ({stray}); move them first")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(staging, out)
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; the package data must be world-readable


def model_card(model, settings: TrainSettings, stats: dict) -> str:
    template = (Path(__file__).resolve().parent / "demo_model_card.md").read_text()
    return template.format(
        parameters=f"{count_parameters(model):,}", python=demo_corpus.python_version(),
        torch=torch.__version__, settings=json.dumps(asdict(settings), indent=2), **stats,
    )


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "node" / "demo_model", help="model directory to write")
    parser.add_argument("--work-dir", type=Path, default=REPO / "build" / "demo-train",
                        help="tokenized corpus cache, checkpoints and the staging export")
    parser.add_argument("--resume", action="store_true", help="continue from --work-dir/checkpoint.pt")
    parser.add_argument("--measure", type=int, default=0, metavar="STEPS",
                        help="only time STEPS training steps in fp32 and bf16, then exit")
    for name, value in asdict(TrainSettings()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, metavar=type(value).__name__.upper())
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = TrainSettings(**{name: getattr(args, name) for name in asdict(TrainSettings())})
    if settings.precision not in ("fp32", "bf16"):
        raise SystemExit(f"--precision must be fp32 or bf16, got {settings.precision!r}")
    torch.set_num_threads(1)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.measure:
        measure(settings, args.work_dir, args.measure)
        return 0
    started = time.perf_counter()
    model, tokenizer, stats = train(settings, args.work_dir, args.resume)
    export(model, tokenizer, settings, stats, args.out, args.work_dir)
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min wall time", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # for shard.manifest and shard.atomic_file
    raise SystemExit(main())
