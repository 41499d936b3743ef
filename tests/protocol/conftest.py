"""Hypothesis settings for the protocol tests: derandomized, so every run tries the same cases.

The profile is registered here and applied per test with `@settings(parent=PROTOCOL_PROFILE)`
(see wire_strategies.py) instead of being loaded globally, so it does not change how other
packages' tests run.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "hearth-protocol",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=100,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
