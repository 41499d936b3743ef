"""A link's latency and bandwidth from timed exchanges; None when the bytes explain nothing."""

from __future__ import annotations

import random

import pytest

from protocol import Exchange, estimate_link


def exchanges(latency: float, bandwidth: float, sizes, noise=lambda: 0.0):
    return [Exchange(size, latency + size / bandwidth + noise()) for size in sizes]


def test_a_slow_link_is_measured():
    estimate = estimate_link(exchanges(0.02, 125_000, [300, 450, 2000, 9000]))
    assert estimate.latency_s == pytest.approx(0.02) and estimate.bandwidth_bytes_per_s == pytest.approx(125_000)


def test_delays_only_add_and_the_fastest_of_each_size_counts():
    rng = random.Random(7)
    sizes = [300, 450, 2000, 9000] * 8
    noisy = exchanges(0.02, 125_000, sizes, noise=lambda: rng.choice([0.0, rng.uniform(0, 0.05)]))
    estimate = estimate_link(noisy)
    assert estimate.bandwidth_bytes_per_s == pytest.approx(125_000, rel=0.05)


def test_a_fast_link_or_one_size_cannot_be_told_apart():
    assert estimate_link(exchanges(0.001, 125e6, [300, 2000, 9000])) is None  # bytes explain 70 us
    assert estimate_link(exchanges(0.02, 125_000, [400, 450, 480])) is None  # one size (a power of two)
    assert estimate_link([]) is None
    # noise that makes small exchanges slower than large ones is not a link
    assert estimate_link([Exchange(300, 0.05), Exchange(9000, 0.01)]) is None
