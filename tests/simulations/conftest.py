"""Helpers for the simulator tests: small versions of the built-in scenarios."""

from __future__ import annotations

import dataclasses

from simulations.scenario import Scenario, load_scenario


def small(name: str, *, nodes: int = 10, clients: int = 2, minutes: float = 10, seed: int | None = None,
          **changes) -> Scenario:
    """Built-in scenario `name` at a scale a unit test can afford."""
    scenario = load_scenario(name).scaled(nodes=nodes, clients=clients, duration_s=minutes * 60, seed=seed)
    return dataclasses.replace(scenario, **changes) if changes else scenario
