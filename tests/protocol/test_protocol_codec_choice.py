"""Adaptive codec choice: a pure function of bandwidth, codec speeds and the error budget."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_strategies import PROTOCOL_PROFILE

from protocol import Codec, CodecSpeed, choose_codec, error_bound
from protocol.codec_choice import CODEC_ERROR_BOUND

MBIT = 1e6 / 8
# Speeds in the spirit of docs/MEASURED.md at hidden 4096 (decode step): fp16 ~6+5 us,
# int8-block64 ~36+12 us, fp32 ~2+2 us, zstd tens of us more.
SPEEDS = (
    CodecSpeed(Codec.FP32, 2000, 0.1, 2000, 0.1),
    CodecSpeed(Codec.FP16, 2000, 1.0, 2000, 0.8),
    CodecSpeed(Codec.BF16, 2000, 1.2, 2000, 0.6),
    CodecSpeed(Codec.INT8_BLOCK64, 10000, 6.0, 4000, 2.0),
    CodecSpeed(Codec.FP16_ZSTD, 30000, 10.0, 25000, 6.0),
    CodecSpeed(Codec.INT8_BLOCK64_ZSTD, 40000, 12.0, 25000, 5.0),
)


def choose(bandwidth: float, **kwargs: object) -> Codec:
    return choose_codec(n_values=4096, bandwidth_bytes_per_s=bandwidth, sender=SPEEDS,
                        receiver=SPEEDS, **kwargs).codec  # type: ignore[arg-type]


def test_fast_lan_prefers_cheap_codecs_and_slow_uplinks_prefer_int8() -> None:
    assert choose(10_000 * MBIT) == Codec.FP32
    assert choose(1_000 * MBIT) == Codec.FP16
    assert choose(100 * MBIT) == Codec.INT8_BLOCK64
    assert choose(10 * MBIT) == Codec.INT8_BLOCK64


def test_the_error_budget_excludes_lossy_codecs() -> None:
    assert choose(10 * MBIT, error_budget=1e-3) == Codec.FP16
    assert choose(10 * MBIT, error_budget=0.0) == Codec.FP32


def test_zstd_wins_only_with_a_measured_gain() -> None:
    assert choose(1 * MBIT) == Codec.INT8_BLOCK64
    measured = {Codec.INT8_BLOCK64_ZSTD: 0.5}
    assert choose(1 * MBIT, wire_bytes_per_value=measured) == Codec.INT8_BLOCK64_ZSTD


def test_only_codecs_both_peers_speak_are_candidates() -> None:
    receiver = [speed for speed in SPEEDS if speed.codec.base != Codec.INT8_BLOCK64]
    choice = choose_codec(n_values=4096, bandwidth_bytes_per_s=10 * MBIT, sender=SPEEDS,
                          receiver=receiver)
    assert choice.codec == Codec.FP16  # same bytes as bf16, a little faster here
    assert Codec.INT8_BLOCK64 not in {cost.codec for cost in choice.costs}
    with pytest.raises(ValueError, match="no codec both peers support"):
        choose_codec(n_values=1, bandwidth_bytes_per_s=1.0, sender=SPEEDS[:1],
                     receiver=SPEEDS[1:2])


def test_costs_are_itemised_and_sorted() -> None:
    choice = choose_codec(n_values=4096, bandwidth_bytes_per_s=100 * MBIT, sender=SPEEDS,
                          receiver=SPEEDS)
    totals = [cost.total_s for cost in choice.costs]
    assert totals == sorted(totals) and choice.costs[0].codec == choice.codec
    int8 = next(cost for cost in choice.costs if cost.codec == Codec.INT8_BLOCK64)
    assert int8.wire_bytes == 4096 * (1 + 2 / 64)
    assert int8.transfer_s == pytest.approx(int8.wire_bytes / (100 * MBIT))
    assert int8.encode_s == pytest.approx((10000 + 6.0 * 4096) * 1e-9)


@settings(PROTOCOL_PROFILE)
@given(st.integers(0, 10**7), st.floats(1e3, 1e11), st.floats(0, 0.01))
def test_choice_is_deterministic_and_optimal(n: int, bandwidth: float, budget: float) -> None:
    first = choose_codec(n_values=n, bandwidth_bytes_per_s=bandwidth, sender=SPEEDS,
                         receiver=SPEEDS[::-1], error_budget=budget)
    again = choose_codec(n_values=n, bandwidth_bytes_per_s=bandwidth, sender=SPEEDS[::-1],
                         receiver=SPEEDS, error_budget=budget)
    assert first == again
    assert all(first.costs[0].total_s <= cost.total_s for cost in first.costs)
    assert all(error_bound(cost.codec) <= budget for cost in first.costs)


def test_error_bounds_cover_every_codec() -> None:
    assert set(CODEC_ERROR_BOUND) == {codec for codec in Codec if not codec.zstd}
    assert error_bound(Codec.BF16_ZSTD) == error_bound(Codec.BF16) == 2**-8


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="bandwidth > 0"):
        choose_codec(n_values=1, bandwidth_bytes_per_s=0, sender=SPEEDS, receiver=SPEEDS)
