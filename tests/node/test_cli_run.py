"""`hearth run` and `hearth manifest` as a user calls them: real processes, exit codes, output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from shard.pipeline import LocalPipeline
from shard.generate import generate_local
from shard.sampling import SamplingParams


def hearth(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("split", ["1", "3"])
def test_run_json_prints_the_greedy_tokens(checkpoint_factory, split):
    model_dir = checkpoint_factory("llama")
    done = hearth("run", "--model", str(model_dir), "--split", split, "--prompt-ids", "5,6,7,8",
                  "--max-new-tokens", "6", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    expected = generate_local(LocalPipeline.load(model_dir), [5, 6, 7, 8], SamplingParams(max_new_tokens=6))
    assert out["prompt_ids"] == [5, 6, 7, 8]
    assert out["token_ids"] == expected.token_ids and len(out["token_ids"]) == 6
    assert out["tokens_per_s"] > 0


def test_run_int4_in_groups_of_64_gives_the_library_s_tokens(checkpoint_factory):
    odd = hearth("run", "--model", str(checkpoint_factory("llama")), "--quant", "int4", "--group-size", "64",
                 "--prompt-ids", "5,6", "--max-new-tokens", "2")  # its MLP is 160 wide
    assert odd.returncode == 2 and "group_size 64 does not divide in_features 160" in odd.stderr
    model_dir = checkpoint_factory("llama", intermediate_size=192)
    done = hearth("run", "--model", str(model_dir), "--quant", "int4", "--group-size", "64", "--threads", "1",
                  "--prompt-ids", "5,6,7,8", "--max-new-tokens", "6", "--json")
    assert done.returncode == 0, done.stderr
    pipeline = LocalPipeline.load(model_dir, quant="int4", group_size=64)
    assert pipeline.spans[0].group_size == 64
    expected = generate_local(pipeline, [5, 6, 7, 8], SamplingParams(max_new_tokens=6))
    assert json.loads(done.stdout)["token_ids"] == expected.token_ids


def test_run_streams_token_ids_without_a_tokenizer(checkpoint_factory):
    done = hearth("run", "--model", str(checkpoint_factory("qwen2")), "--prompt-ids", "9,10",
                  "--max-new-tokens", "4", "--temperature", "0.8", "--seed", "3")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) == 4


@pytest.mark.parametrize("args, message", [
    (["--split", "9"], "split 6 blocks into 9"),
    (["--quant", "int8", "--prompt-ids", "1,x"], "--prompt-ids"),
    (["--temperature", "-1"], "temperature"),
    (["--prompt-ids", "1,999"], "999"),
    (["--threads", "-1"], "--threads"),
])
def test_run_bad_input_is_one_line_and_status_2(checkpoint_factory, args, message):
    base = ["run", "--model", str(checkpoint_factory("llama")), "--max-new-tokens", "2"]
    if "--prompt-ids" not in args:
        args = [*args, "--prompt-ids", "1,2"]
    done = hearth(*base, *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_run_refuses_an_unsupported_architecture(checkpoint_factory, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(checkpoint_factory("llama"), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(config))
    done = hearth("run", "--model", str(model_dir), "--prompt-ids", "1")
    assert done.returncode == 2 and "FalconForCausalLM" in done.stderr


def test_manifest_command_then_a_tampered_file_is_refused(checkpoint_factory, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(checkpoint_factory("llama"), model_dir)
    done = hearth("manifest", str(model_dir))
    assert done.returncode == 0 and (model_dir / "hearth-manifest.json").exists()
    (model_dir / "config.json").write_text((model_dir / "config.json").read_text() + " ")
    done = hearth("run", "--model", str(model_dir), "--prompt-ids", "1")
    assert done.returncode == 2 and "config.json" in done.stderr


def test_manifest_prints_the_digest_last_and_writes_version_2(checkpoint_factory, tmp_path):
    from shard.manifest import load_manifest
    from shard.model_dir import ModelDir

    model_dir = tmp_path / "model"
    shutil.copytree(checkpoint_factory("llama"), model_dir)
    done = hearth("manifest", str(model_dir))
    assert done.returncode == 0, done.stderr
    digest = done.stdout.strip().splitlines()[-1]
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert digest == ModelDir(model_dir).digest == load_manifest(model_dir).digest
    assert json.loads((model_dir / "hearth-manifest.json").read_text())["version"] == 2
    again = hearth("manifest", str(model_dir))  # refreshing an unchanged directory: the same identity
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == digest


def test_manifest_of_what_is_not_a_model_says_one_line_and_exits_2(tmp_path, capsys):
    from node.cli import main  # in this process: the command's own error path, without three interpreter starts

    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a model")
    for path, says in [(tmp_path / "absent", "no such file"), (tmp_path / "empty", "config.json"),
                       (tmp_path / "notes.txt", "neither a model directory nor a GGUF file")]:
        assert main(["manifest", str(path)]) == 2, path
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and says in err and "Traceback" not in err
    assert not (tmp_path / "empty" / "hearth-manifest.json").exists()


@pytest.mark.parametrize("command", ["generate", "api"])
def test_a_client_given_no_way_to_find_peers_says_so(checkpoint_factory, command):
    args = ["--prompt-ids", "1,2"] if command == "generate" else []
    done = hearth(command, "--model", str(checkpoint_factory("llama")), *args)
    assert done.returncode == 2
    assert "--bootstrap" in done.stderr and "--mdns" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
