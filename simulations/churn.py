"""Churn as pure functions: session lengths, arrivals, the day, the order of a swizzle-clog.

Everything takes the time (`now`, seconds since the run started) and a seeded `random.Random`, so
tests call these directly and a run replays exactly. Session lengths are Weibull (household P2P
measurements give shapes around 0.4-0.5: many short sessions, a long tail); arrivals are a Poisson
process whose rate follows the day (thinning); hosts present at the start have the *residual*
lengths of a population already in equilibrium, so the swarm does not start with a wave of
departures.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

from simulations.scenario import ChurnSpec, DayNight


def weibull_scale(shape: float, median_s: float) -> float:
    """The Weibull scale whose median is `median_s`."""
    return median_s / math.log(2) ** (1.0 / shape)


def mean_session(shape: float, median_s: float) -> float:
    return weibull_scale(shape, median_s) * math.gamma(1.0 + 1.0 / shape)


def session_length(rng: random.Random, shape: float, median_s: float) -> float:
    """A fresh session's length."""
    return rng.weibullvariate(weibull_scale(shape, median_s), shape)


def residual_length(rng: random.Random, shape: float, median_s: float) -> float:
    """The remaining length of a session seen in progress at a random moment (equilibrium).

    The session in progress is length-biased: for a Weibull, (L/scale)**shape ~ Gamma(1 + 1/shape).
    What is left of it is a uniform share of it.
    """
    biased = weibull_scale(shape, median_s) * rng.gammavariate(1.0 + 1.0 / shape, 1.0) ** (1.0 / shape)
    return rng.random() * biased


def day_factor(now: float, day: DayNight) -> float:
    """How busy the world is at `now` relative to the daily mean (1 + amplitude * cos)."""
    hour = (day.start_hour + now / 3600.0) % 24.0
    return 1.0 + day.amplitude * math.cos(2 * math.pi * (hour - day.peak_hour) / 24.0)


def next_arrival(now: float, rate_per_s: float, day: DayNight, rng: random.Random) -> float:
    """The time of the next arrival of a Poisson process whose rate is `rate_per_s * day_factor`."""
    if rate_per_s <= 0:
        return math.inf
    peak = rate_per_s * (1.0 + abs(day.amplitude))
    t = now
    while True:
        t += rng.expovariate(peak)
        if rng.random() * peak <= rate_per_s * day_factor(t, day):
            return t


def arrival_rate(churn: ChurnSpec) -> float:
    """Arrivals per second that keep `churn.nodes` hosts online on average (Little's law)."""
    return churn.nodes / mean_session(churn.shape, churn.median_s)


def weighted_choice(rng: random.Random, weights: Mapping[str, float]) -> str:
    """One key, with probability proportional to its weight (keys in sorted order: deterministic)."""
    keys = sorted(k for k, w in weights.items() if w > 0)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def departure(rng: random.Random, churn: ChurnSpec) -> str:
    """How a session ends: "leave" (drained), "crash" or "freeze"."""
    return weighted_choice(rng, {"leave": churn.leave, "crash": churn.crash, "freeze": churn.freeze})


def swizzle_order(peers: Sequence[str], count: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """Hosts to clog one by one, and the (different, random) order to restore them in."""
    chosen = rng.sample(sorted(peers), min(count, len(peers)))
    restore = list(chosen)
    rng.shuffle(restore)
    return chosen, restore
