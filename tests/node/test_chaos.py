"""`hearth node --chaos`: faults on purpose, parsed with one-line errors, announced, seeded."""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pytest
import trio

from node.chaos import Chaos, ChaosSpec, parse_chaos
from node.daemon import add_arguments, settings_from_args, warn_chaos
from shard.errors import InvalidInput


def settings(tmp_path, *flags: str):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from_args(parser.parse_args(["--model", str(tmp_path), "--blocks", "0:2", *flags]))


def test_no_chaos_unless_asked(tmp_path):
    assert settings(tmp_path).chaos is None
    assert settings(tmp_path, "--chaos", "corrupt:0.01").chaos == ChaosSpec("corrupt", relative=0.01)
    assert settings(tmp_path, "--chaos", "corrupt-sometimes:0.01:0.2", "--chaos-seed", "4").chaos == \
        ChaosSpec("corrupt-sometimes", relative=0.01, probability=0.2, seed=4)
    assert settings(tmp_path, "--chaos", "stall:2.5").chaos == ChaosSpec("stall", stall_s=2.5)


@pytest.mark.parametrize("text, says", [
    ("corupt:0.01", "unknown fault 'corupt'"),
    ("corrupt", "corrupt takes 1 value"),
    ("corrupt:0.01:0.2", "corrupt takes 1 value"),
    ("corrupt-sometimes:0.01", "corrupt-sometimes takes 2 value"),
    ("corrupt:lots", "values must be numbers"),
    ("corrupt:nan", "must be finite"),
    ("corrupt:0", "REL must be positive"),
    ("corrupt-sometimes:0.01:1.5", "P must be in (0, 1]"),
    ("stall:-1", "SECONDS must be positive"),
])
def test_bad_values_are_refused_in_one_line(tmp_path, text, says):
    with pytest.raises(InvalidInput) as err:
        settings(tmp_path, "--chaos", text)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_a_seed_without_chaos_is_refused(tmp_path):
    with pytest.raises(InvalidInput, match="--chaos-seed needs --chaos"):
        settings(tmp_path, "--chaos-seed", "3")


def test_chaos_is_announced_at_warning(caplog, capsys):
    with caplog.at_level(logging.WARNING, logger="hearth.node"):
        warn_chaos(parse_chaos("corrupt:0.01"))
    [record] = caplog.records
    assert record.levelno == logging.WARNING and record.getMessage().startswith("CHAOS:")
    assert "CHAOS:" in capsys.readouterr().out


async def test_corruption_is_relative_and_seeded():
    output = np.random.default_rng(0).standard_normal((1, 5, 64)).astype(np.float32) * 3
    first, second = Chaos(parse_chaos("corrupt:0.01", seed=1)), Chaos(parse_chaos("corrupt:0.01", seed=1))
    noisy = await first.apply(output)
    assert np.array_equal(noisy, await second.apply(output))  # seeded: runs repeat
    relative = np.sqrt(((noisy - output) ** 2).mean(-1)) / np.sqrt((output ** 2).mean(-1))
    assert np.all((relative > 0.006) & (relative < 0.014)) and first.steps_corrupted == 1


async def test_corrupt_sometimes_corrupts_about_p_of_the_steps():
    chaos = Chaos(parse_chaos("corrupt-sometimes:0.01:0.2", seed=2))
    output = np.ones((1, 1, 8), dtype=np.float32)
    changed = [not np.array_equal(await chaos.apply(output), output) for _ in range(500)]
    assert 70 < sum(changed) < 130 and chaos.steps_corrupted == sum(changed)


async def test_stall_answers_late(autojump_clock):
    chaos = Chaos(parse_chaos("stall:3"))
    started = trio.current_time()
    output = np.ones((1, 1, 8), dtype=np.float32)
    assert (await chaos.apply(output)) is output and trio.current_time() - started == pytest.approx(3.0)


def test_metrics_show_a_chaos_node(checkpoint_factory):
    from prometheus_client import generate_latest

    from node.node import Node
    from shard.span import load_span

    span = load_span(checkpoint_factory("llama"), 0, 2)
    node = Node(span, "tiny", "digest", token_seconds=0.01, chaos=Chaos(parse_chaos("corrupt:0.01")))
    text = generate_latest(node.metrics.registry).decode()
    assert 'hearth_chaos_enabled{kind="corrupt"} 1.0' in text and "hearth_chaos_corrupted_steps_total 0.0" in text
    honest = Node(span, "tiny", "digest", token_seconds=0.01)
    assert "hearth_chaos" not in generate_latest(honest.metrics.registry).decode()
