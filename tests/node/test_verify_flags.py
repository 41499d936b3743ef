"""`--verify-rate` on the commands that generate, and the `verification` object they report."""

from __future__ import annotations

import argparse

import pytest

from mesh.client import ClientOptions, GenerationReport
from mesh.spot_check import VerificationReport
from node.api import _route_json
from node.client_args import add_client_arguments, client_options
from node.generate_remote import report_json
from shard.errors import InvalidInput


def options(*flags: str) -> ClientOptions:
    parser = argparse.ArgumentParser()
    add_client_arguments(parser, model_help="", timeout_help="")
    return client_options(parser.parse_args(["--model", "m", "--local-blocks", "0", *flags]))


def test_verification_is_off_by_default_and_takes_a_rate():
    assert options().verify_rate == 0.0
    assert options("--verify-rate", "0.1").verify_rate == 0.1
    assert options("--verify-tolerance", "0.015").verify_tolerance == 0.015
    with pytest.raises(InvalidInput, match="--verify-tolerance must be positive"):
        options("--verify-tolerance", "0")
    for bad in ("1.5", "-0.1", "nan"):
        with pytest.raises(InvalidInput, match=r"--verify-rate must be in \[0, 1\]"):
            options("--verify-rate", bad)
    with pytest.raises(InvalidInput, match="verify rate must be in"):
        ClientOptions(verify_rate=2.0)
    with pytest.raises(InvalidInput, match="verify tolerance must be positive"):
        ClientOptions(verify_tolerance=0.0)


def test_generate_json_and_the_api_carry_the_verification_object():
    report = GenerationReport([1, 2], token_ids=[3])
    report.verification = VerificationReport(0.1, checks=4, disagreements=1, banned=["12D3KooWLiar"], rollbacks=1,
                                             tokens_redone=3)
    for carried in (report_json(report)["verification"], _route_json(report)["verification"]):
        assert carried["checks"] == 4 and carried["disagreements"] == 1 and carried["banned"] == ["12D3KooWLiar"]
        assert carried["rate"] == 0.1 and carried["rollbacks"] == 1 and carried["tokens_redone"] == 3
    assert report_json(GenerationReport([1]))["verification"]["rate"] == 0.0  # off: there, and says so


def test_every_command_that_generates_takes_the_rate():
    from node.daemon import add_arguments as node_arguments, settings_from_args
    from node.demo import add_arguments as demo_arguments, run as run_demo

    parser = argparse.ArgumentParser()
    node_arguments(parser)
    node = ["--model", "m", "--blocks", "0:1"]
    settings = settings_from_args(parser.parse_args([*node, "--api-port", "0", "--verify-rate", "0.1"]))
    assert settings.api_client.verify_rate == 0.1  # the API's own client checks its routes
    with pytest.raises(InvalidInput, match="need --api-port"):
        settings_from_args(parser.parse_args([*node, "--verify-rate", "0.1"]))
    parser = argparse.ArgumentParser()
    demo_arguments(parser)
    assert parser.parse_args(["--verify-rate", "0.2"]).verify_rate == 0.2
    with pytest.raises(InvalidInput, match=r"--verify-rate must be in \[0, 1\]"):
        run_demo(parser.parse_args(["--verify-rate", "3"]))


def test_the_report_says_what_checks_found_in_one_line():
    text = VerificationReport(0.1, checks=4, disagreements=1, banned=["12D3KooWLiarAB"], rollbacks=1,
                              tokens_redone=3, unchecked=2).text()
    assert text == ("spot checks at 0.1: 4 checks, 1 disagreements, banned LiarAB, 1 rollbacks (3 tokens redone), "
                    "2 unchecked (no second node with the same blocks)")
