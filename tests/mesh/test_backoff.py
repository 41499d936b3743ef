"""Retry policy: backoff grows, is capped and jittered reproducibly; bans lengthen on repeat."""

from __future__ import annotations

import random

from mesh.backoff import BanList, backoff_delay


def test_backoff_grows_then_caps_with_jitter_in_range():
    rng = random.Random(1)
    delays = [backoff_delay(a, rng, base_s=0.1, cap_s=2.0) for a in range(8)]
    for attempt, delay in enumerate(delays):
        ceiling = min(2.0, 0.1 * 2**attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert delays[-1] <= 2.0


def test_backoff_is_reproducible_from_the_seed():
    a = [backoff_delay(i, random.Random(7)) for i in range(5)]
    b = [backoff_delay(i, random.Random(7)) for i in range(5)]
    assert a == b


def test_bans_expire_and_lengthen_on_repeat():
    bans = BanList(base_s=10, cap_s=25)
    assert bans.ban("p", now=0) == 10
    assert bans.banned(5) == {"p"} and bans.banned(10) == frozenset()
    assert bans.ban("p", now=20) == 20
    assert bans.ban("p", now=50) == 25  # capped
    assert bans.banned(74) == {"p"} and bans.banned(75) == frozenset()


def test_a_busy_peer_sits_out_briefly_without_a_strike():
    bans = BanList(base_s=15.0, busy_s=2.0)
    assert bans.ban("full", 100.0, busy=True) == 2.0
    assert "full" in bans.banned(101.0) and "full" not in bans.banned(102.5)
    assert bans.ban("full", 103.0) == 15.0  # its first real failure still gets the first ban length
    assert bans.ban("full", 104.0, busy=True) == 2.0 and "full" in bans.banned(117.0)  # a busy refusal never shortens a ban
