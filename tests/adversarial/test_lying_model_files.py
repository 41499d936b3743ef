"""Model files that lie (issue 18, item 11): a config.json claiming absurd sizes, and tokenizer or
chat-template files changed after the manifest was written. Each gets one line naming what is wrong
and exit status 2 from the commands, before any byte is allocated from the lie or any template
(which is code) runs."""

from __future__ import annotations

import json
import shutil

import pytest

from node.cli import main
from shard.errors import ConfigError, ManifestMismatch
from shard.manifest import MANIFEST_NAME, write_manifest
from shard.model_dir import ModelDir
from tests.integration.conftest import chat_model_dir  # noqa: F401 - fixture: the tiny llama with a tokenizer


@pytest.fixture
def copy_of(tmp_path):
    def make(model_dir, manifest: bool):
        target = tmp_path / "model"
        shutil.copytree(model_dir, target)
        (target / MANIFEST_NAME).unlink(missing_ok=True)
        if manifest:
            write_manifest(target)
        return target
    return make


@pytest.mark.parametrize("field, value", [("hidden_size", 2 ** 40), ("vocab_size", 2 ** 31),
                                          ("num_hidden_layers", 10 ** 6), ("max_position_embeddings", 2 ** 40),
                                          ("num_attention_heads", 2 ** 20)])
def test_a_config_claiming_absurd_sizes_gets_one_line_and_status_2(checkpoint_factory, copy_of, capsys, field, value):
    model = copy_of(checkpoint_factory("llama"), manifest=False)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, field: value}))
    capsys.readouterr()  # whatever building the checkpoint printed
    with pytest.raises(ConfigError, match=field):
        ModelDir(model)
    for command in (["run", "--model", str(model), "--prompt-ids", "1,2", "--max-new-tokens", "1"],
                    ["node", "--model", str(model), "--blocks", "0:1"]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and field in err and "beyond" in err, err


@pytest.mark.parametrize("changed", ["tokenizer.json", "tokenizer_config.json"])
def test_tokenizer_and_template_files_are_checked_against_the_manifest(chat_model_dir, copy_of, capsys, changed):
    model = copy_of(chat_model_dir, manifest=True)
    assert ModelDir(model).tokenizer() is not None  # as written: accepted
    path = model / changed
    data = json.loads(path.read_text())
    if changed == "tokenizer_config.json":  # a template is code run on every prompt: swap in another
        data["chat_template"] = "{{ messages[0]['content'] }} and something the model's author never wrote"
    else:
        data.setdefault("added_tokens", []).append({"id": 999, "content": "<evil>", "special": True, "single_word": False,
                                                    "lstrip": False, "rstrip": False, "normalized": False})
    path.write_text(json.dumps(data))
    capsys.readouterr()
    with pytest.raises(ManifestMismatch, match=changed):
        ModelDir(model).tokenizer()
    assert main(["run", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and changed in err
