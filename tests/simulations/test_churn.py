"""Churn and placement as pure functions, driven with seeded generators."""

from __future__ import annotations

import random
import statistics

import pytest

from simulations import churn
from simulations.scenario import ChurnSpec, DayNight


def test_weibull_sessions_have_the_median_asked_for():
    rng = random.Random(1)
    lengths = [churn.session_length(rng, 0.4, 1800.0) for _ in range(20000)]
    assert statistics.median(lengths) == pytest.approx(1800.0, rel=0.05)
    assert statistics.mean(lengths) > 3 * statistics.median(lengths)  # shape 0.4: a long tail


def test_residual_lengths_of_sessions_in_progress_are_longer_than_fresh_ones():
    rng = random.Random(2)
    fresh = statistics.mean(churn.session_length(rng, 0.5, 3600) for _ in range(20000))
    residual = statistics.mean(churn.residual_length(rng, 0.5, 3600) for _ in range(20000))
    # for a Weibull of shape 0.5 the mean residual is E[L^2] / (2 E[L]) = 3 x the mean
    assert residual == pytest.approx(3 * fresh, rel=0.15)


def test_day_factor_peaks_at_the_peak_hour():
    day = DayNight(start_hour=18, peak_hour=21, amplitude=0.5)
    assert churn.day_factor(3 * 3600, day) == pytest.approx(1.5)
    assert churn.day_factor(15 * 3600, day) == pytest.approx(0.5)
    assert churn.day_factor(123.0, DayNight()) == 1.0


def test_poisson_arrivals_follow_the_rate():
    rng, t, count = random.Random(3), 0.0, 0
    while (t := churn.next_arrival(t, 0.5, DayNight(), rng)) < 10000:
        count += 1
    assert count == pytest.approx(5000, rel=0.05)


def test_arrival_rate_keeps_the_population():
    spec = ChurnSpec(nodes=100, shape=0.5, median_s=3600)
    assert churn.arrival_rate(spec) * churn.mean_session(0.5, 3600) == pytest.approx(100)


def test_swizzle_restores_in_another_order():
    clog, restore = churn.swizzle_order([f"n{i}" for i in range(10)], 6, random.Random(4))
    assert len(clog) == 6 and sorted(clog) == sorted(restore) and clog != restore


def test_departures_follow_their_weights():
    rng = random.Random(5)
    spec = ChurnSpec(leave=1, crash=0, freeze=3)
    kinds = [churn.departure(rng, spec) for _ in range(4000)]
    assert kinds.count("crash") == 0 and kinds.count("freeze") == pytest.approx(3000, rel=0.05)
