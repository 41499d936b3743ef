"""`hearth node` settings that need no process: where the data channel listens and what it offers."""

from __future__ import annotations

import argparse

import pytest

from node.daemon import add_arguments, data_channels, settings_from_args


@pytest.mark.parametrize("listen, announced, bind, offered", [
    (("/ip4/127.0.0.1/tcp/0",), ["/ip4/127.0.0.1/tcp/4001"], "127.0.0.1", "127.0.0.1"),
    (("/ip4/0.0.0.0/tcp/4001",), ["/ip4/0.0.0.0/tcp/4001", "/ip4/192.168.1.20/tcp/4001"], "0.0.0.0", "192.168.1.20"),
    (("/ip4/0.0.0.0/tcp/4001",), ["/ip4/127.0.0.1/tcp/4001", "/ip4/192.168.1.20/tcp/4001"], "0.0.0.0", "192.168.1.20"),
    (("/ip4/0.0.0.0/tcp/4001",), ["/ip4/127.0.0.1/tcp/4001"], "0.0.0.0", "127.0.0.1"),
    (("/ip6/::1/tcp/0",), ["/ip6/::1/tcp/4001"], "::1", "::1"),
])
def test_the_data_channel_binds_the_listen_host_and_offers_a_reachable_one(listen, announced, bind, offered):
    channels = data_channels(listen, announced)
    assert channels.host == bind and channels.advertise_host == offered
    channels.port = 4002
    assert channels.address == (f"[{offered}]:4002" if ":" in offered else f"{offered}:4002")


def test_no_ip_address_means_no_data_channel():
    assert data_channels(("/dns4/example.org/tcp/4001",), []) is None
    assert data_channels(("/ip4/0.0.0.0/tcp/4001",), ["/ip4/0.0.0.0/tcp/4001"]) is None


def test_no_data_channel_flag(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--model", str(tmp_path), "--blocks", "0:2"]
    assert settings_from_args(parser.parse_args(base)).data_channel
    assert not settings_from_args(parser.parse_args([*base, "--no-data-channel"])).data_channel


def test_int4_group_size_reaches_the_span_and_its_record(tmp_path):
    from types import SimpleNamespace

    from node.node import quantization_name

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--model", str(tmp_path), "--blocks", "0:2", "--quant", "int4"]
    assert settings_from_args(parser.parse_args(base)).group_size == 32
    assert settings_from_args(parser.parse_args([*base, "--group-size", "64"])).group_size == 64
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--group-size", "48"])  # argparse: one line naming the choices
    names = [quantization_name(SimpleNamespace(quant=quant, group_size=group))
             for quant, group in (("none", 32), ("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128))]
    assert names == ["none", "int8", "int4", "int4-g64", "int4-g128"]
    assert quantization_name(SimpleNamespace(quant="int8")) == "int8"  # the simulator's stand-in spans


def test_prefill_budget_flag(tmp_path):
    from shard.errors import InvalidInput

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--model", str(tmp_path), "--blocks", "0:2"]

    def budget(*flags: str) -> int:
        return settings_from_args(parser.parse_args([*base, *flags])).limits.max_prefill_tokens_per_minute

    assert budget() == 8 * 4096  # eight whole contexts a minute
    assert budget("--max-length", "2048") == 8 * 2048
    assert budget("--max-prefill-tokens-per-minute", "0") == 0  # unlimited
    assert budget("--max-prefill-tokens-per-minute", "4096") == 4096
    with pytest.raises(InvalidInput, match="at least --max-length 4096, so one whole prompt fits, got 1000"):
        budget("--max-prefill-tokens-per-minute", "1000")
    with pytest.raises(InvalidInput, match="got -1"):
        budget("--max-prefill-tokens-per-minute", "-1")
