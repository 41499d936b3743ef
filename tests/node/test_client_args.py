"""The privacy flags of the commands that generate (`--local-blocks`, `--trust-peers`, `--swarm-secret`)
and of `hearth node`: what they become, and one-line errors for bad input."""

from __future__ import annotations

import argparse

import pytest

from mesh.first_blocks import AUTO_BLOCKS
from mesh.swarm_secret import SwarmSecret
from node import daemon, demo
from node.client_args import add_client_arguments, client_options
from shard.errors import InvalidInput
from tests.node.test_cli_run import hearth

SECRET = "correct horse battery staple 42"


def client_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_client_arguments(parser, model_help="", timeout_help="")
    return parser


def options(*flags: str):
    return client_options(client_parser().parse_args(["--model", "m", *flags]))


def test_local_blocks_default_to_auto_and_take_a_count():
    assert options().local_blocks == AUTO_BLOCKS
    assert options("--local-blocks", "auto").local_blocks == AUTO_BLOCKS
    assert options("--local-blocks", "0").local_blocks == 0
    assert options("--local-blocks", "2").local_blocks == 2
    for bad in ("x", "-1", "1.5", ""):
        with pytest.raises(InvalidInput, match=f"--local-blocks must be a block count .* got {bad!r}"):
            options("--local-blocks", bad)


def test_trusted_peers_come_from_a_file_like_the_allow_list(tmp_path):
    listed = tmp_path / "peers"
    listed.write_text("# the household\n12D3KooWLaptop  # Ana's laptop\n\n  12D3KooWDesktop\n#12D3KooWOld\n")
    assert options("--trust-peers", str(listed)).trusted_peers == frozenset({"12D3KooWLaptop", "12D3KooWDesktop"})
    assert daemon.read_allow_list(listed) == frozenset({"12D3KooWLaptop", "12D3KooWDesktop"})  # one parser
    assert options().trusted_peers is None
    (tmp_path / "empty").write_text("# nobody yet\n")
    (tmp_path / "two").write_text("12D3KooWA 12D3KooWB\n")
    for name, message in (("empty", "lists no peer id"), ("two", r"line 1: expected one peer id"),
                          ("missing", "cannot read --trust-peers file")):
        with pytest.raises(InvalidInput, match=message):
            options("--trust-peers", str(tmp_path / name))


def test_the_swarm_secret_comes_from_a_file(tmp_path):
    (tmp_path / "secret").write_text(SECRET + "\n")
    assert options("--swarm-secret", str(tmp_path / "secret")).swarm_secret == SwarmSecret(SECRET.encode())
    (tmp_path / "short").write_text("hunter2\n")
    with pytest.raises(InvalidInput, match=r"--swarm-secret file .*short: a swarm secret needs at least 16 bytes, got 7"):
        options("--swarm-secret", str(tmp_path / "short"))
    with pytest.raises(InvalidInput, match="cannot read --swarm-secret file"):
        options("--swarm-secret", str(tmp_path / "missing"))


def test_a_node_s_secret_admits_and_its_api_client_trusts(tmp_path):
    parser = argparse.ArgumentParser()
    daemon.add_arguments(parser)
    (tmp_path / "secret").write_text(SECRET)
    (tmp_path / "peers").write_text("12D3KooWLaptop\n")
    base = ["--model", str(tmp_path), "--blocks", "0:2"]
    plain = daemon.settings_from_args(parser.parse_args(base))
    assert plain.swarm_secret is None and plain.api_client.local_blocks == AUTO_BLOCKS
    settings = daemon.settings_from_args(parser.parse_args([
        *base, "--swarm-secret", str(tmp_path / "secret"), "--api-port", "0", "--trust-peers", str(tmp_path / "peers"),
        "--local-blocks", "0"]))
    assert settings.swarm_secret == settings.api_client.swarm_secret == SwarmSecret(SECRET.encode())
    assert settings.api_client.trusted_peers == frozenset({"12D3KooWLaptop"}) and settings.api_client.local_blocks == 0
    with pytest.raises(InvalidInput, match="need --api-port"):
        daemon.settings_from_args(parser.parse_args([*base, "--local-blocks", "1"]))


def test_the_demo_takes_local_blocks():
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert parser.parse_args([]).local_blocks is None  # auto, once checked by `demo.run`


def test_a_bad_privacy_flag_is_one_line_and_status_2(checkpoint_factory):
    done = hearth("generate", "--model", str(checkpoint_factory("llama")), "--prompt-ids", "1,2",
                  "--bootstrap", "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWNobody", "--local-blocks", "two")
    assert done.returncode == 2
    assert "--local-blocks must be a block count" in done.stderr and len(done.stderr.strip().splitlines()) == 1
