"""Our spans and head against the transformers reference: same checkpoint, same inputs, same logits."""

from __future__ import annotations

import pytest
import torch

from shard.pipeline import LocalPipeline

PROMPT_LEN, DECODE_STEPS = 7, 10


def reference_logits(model_dir, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits at every position of `ids` ([B, T] -> [B, T, V]), in fp32."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.to(torch.float32)


def greedy_run(pipeline: LocalPipeline, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill `prompt` then decode `steps` greedy tokens; returns (all ids, logits per step [B, steps+1, V])."""
    pipeline.start(batch=prompt.shape[0], max_length=prompt.shape[1] + steps)
    ids, logits = prompt, [pipeline.forward(prompt)]
    for _ in range(steps):
        next_ids = logits[-1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_ids], dim=1)
        logits.append(pipeline.forward(next_ids))
    return ids, torch.stack(logits, dim=1)


def prompt_ids(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "llama3", "llama-linear", "mistral", "qwen2"])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_logits_match_reference(checkpoint_factory, family, parts):
    model_dir = checkpoint_factory(family)
    ids, ours = greedy_run(LocalPipeline.load(model_dir, parts=parts), prompt_ids(), DECODE_STEPS)
    ref = reference_logits(model_dir, ids)[:, PROMPT_LEN - 1 :]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))  # the greedy tokens are the reference's too
    assert ref.abs().max().item() > 0.5, "logits too small for the comparison to mean anything"


def test_batch_of_sequences_matches_reference(checkpoint_factory):
    model_dir = checkpoint_factory("llama")
    ids, ours = greedy_run(LocalPipeline.load(model_dir, parts=2), prompt_ids(batch=3), DECODE_STEPS)
    ref = reference_logits(model_dir, ids)[:, PROMPT_LEN - 1 :]
    assert (ours - ref).abs().max().item() <= 1e-4


def test_sharded_checkpoint_matches_reference(checkpoint_factory):
    model_dir = checkpoint_factory("llama", shard_size="100KB")
    assert (model_dir / "model.safetensors.index.json").exists()
    ids, ours = greedy_run(LocalPipeline.load(model_dir, parts=3), prompt_ids(), DECODE_STEPS)
    ref = reference_logits(model_dir, ids)[:, PROMPT_LEN - 1 :]
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_matches_reference_in_fp32(checkpoint_factory, dtype):
    model_dir = checkpoint_factory("llama", dtype=dtype)
    ids, ours = greedy_run(LocalPipeline.load(model_dir, parts=2), prompt_ids(), DECODE_STEPS)
    ref = reference_logits(model_dir, ids)[:, PROMPT_LEN - 1 :]
    assert (ours - ref).abs().max().item() <= 1e-4


def test_prefill_in_chunks_equals_one_prefill(checkpoint_factory):
    model_dir = checkpoint_factory("mistral")
    prompt = prompt_ids()
    whole = LocalPipeline.load(model_dir, parts=2)
    whole.start(1, 16)
    chunked = LocalPipeline.load(model_dir, parts=2)
    chunked.start(1, 16)
    chunked.forward(prompt[:, :3])
    assert torch.allclose(whole.forward(prompt), chunked.forward(prompt[:, 3:]), atol=1e-5)


def test_sub_span_of_a_span_computes_the_same_as_loading_those_blocks(checkpoint_factory):
    from shard.head import load_head
    from shard.span import load_span

    model_dir = checkpoint_factory("llama3")
    hidden = load_head(model_dir).embed(prompt_ids())
    view = load_span(model_dir, 1, 6).sub_span(2, 4)
    direct = load_span(model_dir, 2, 4)
    assert torch.equal(view(hidden, view.new_cache(1, 8)), direct(hidden, direct.new_cache(1, 8)))
