"""The conversation as data: protocol ids, Hello negotiation, and the codec a session speaks."""

from __future__ import annotations

import pytest

from protocol import (
    AUTO, CAPABILITIES, CHUNK_INVARIANT, DATA_CHANNEL, INFERENCE_PROTOCOL, INFO_PROTOCOL, REFERENCE_SPEEDS, REPLAY_CHUNKS, REWIND_STEPS, Codec,
    CodecSpeed, Hello, LinkEstimate, choose_session_codec, negotiate, session_codec,
)

MBIT = 1e6 / 8  # bytes per second
SLOW, FAST = LinkEstimate(0.02, 1 * MBIT), LinkEstimate(0.0005, 1000 * MBIT)


def hellos(client_codecs=tuple(Codec), hop_codecs=tuple(Codec), speeds=REFERENCE_SPEEDS):
    client = Hello(software="c", codecs=client_codecs, capabilities=CAPABILITIES, codec_speeds=speeds)
    hop = Hello(software="h", codecs=hop_codecs, capabilities=(REPLAY_CHUNKS,), codec_speeds=speeds)
    return negotiate(client, hop)


def test_protocol_ids_and_capabilities_are_the_protocols():
    assert (INFERENCE_PROTOCOL, INFO_PROTOCOL) == ("/hearth/inference/1", "/hearth/info/1")
    assert set(CAPABILITIES) == {DATA_CHANNEL, REPLAY_CHUNKS, REWIND_STEPS, CHUNK_INVARIANT}


def test_negotiation_keeps_what_both_hellos_list():
    agreement = hellos(client_codecs=(Codec.FP16, Codec.INT8_BLOCK64, Codec.FP32),
                       hop_codecs=(Codec.FP32, Codec.FP16, Codec.BF16))
    assert agreement.codecs == (Codec.FP16, Codec.FP32)
    assert agreement.supports(REPLAY_CHUNKS) and not agreement.supports(DATA_CHANNEL)  # only the client offers it
    assert {s.codec for s in agreement.client_speeds} == {s.codec for s in agreement.hop_speeds} \
        == {Codec.FP16, Codec.FP32}
    assert agreement.codec(Codec.FP16) is Codec.FP16
    assert agreement.codec(Codec.INT8_BLOCK64) is Codec.FP32  # not shared: the codec every peer speaks


def test_a_slow_link_gets_the_compact_codec_and_a_fast_one_fp16():
    for hidden in (64, 4096):
        assert session_codec(hellos(), AUTO, n_values=hidden, link=SLOW) is Codec.INT8_BLOCK64
        assert session_codec(hellos(), AUTO, n_values=hidden, link=FAST) is Codec.FP16


def test_auto_stays_on_fp16_until_it_knows_better():
    assert session_codec(hellos(), AUTO, n_values=4096, link=None) is Codec.FP16  # link not measured
    assert session_codec(hellos(speeds=()), AUTO, n_values=4096, link=SLOW) is Codec.FP16  # no speeds announced
    assert session_codec(hellos(hop_codecs=(Codec.FP32, Codec.INT8_BLOCK64)), AUTO, n_values=4096,
                         link=None) is Codec.FP32  # fp16 not shared


def test_an_explicit_codec_wins_over_the_link():
    assert session_codec(hellos(), Codec.FP32, n_values=4096, link=SLOW) is Codec.FP32
    assert session_codec(hellos(), Codec.BF16, n_values=4096, link=FAST) is Codec.BF16
    assert session_codec(hellos(hop_codecs=(Codec.FP32,)), Codec.FP16, n_values=4096, link=None) is Codec.FP32


def test_the_accuracy_budget_bounds_the_choice():
    choice = choose_session_codec(n_values=4096, bandwidth_bytes_per_s=SLOW.bandwidth_bytes_per_s,
                                  client=REFERENCE_SPEEDS, hop=REFERENCE_SPEEDS, error_budget=1e-3)
    assert choice.codec is Codec.FP16  # int8 and bf16 are over budget; fp16 halves fp32's bytes
    assert {cost.codec for cost in choice.costs} == {Codec.FP32, Codec.FP16}


def test_a_saving_too_small_to_matter_keeps_the_default():
    """On a fast link fp32 is a few microseconds cheaper than fp16 (no conversion), within noise."""
    choice = choose_session_codec(n_values=64, bandwidth_bytes_per_s=FAST.bandwidth_bytes_per_s,
                                  client=REFERENCE_SPEEDS, hop=REFERENCE_SPEEDS)
    assert choice.costs[0].codec is Codec.FP32 and choice.codec is Codec.FP16
    assert choose_session_codec(n_values=64, bandwidth_bytes_per_s=FAST.bandwidth_bytes_per_s,
                                client=REFERENCE_SPEEDS, hop=REFERENCE_SPEEDS, min_saving_s=0).codec is Codec.FP32


def test_costs_count_both_directions_with_each_sides_speeds():
    slow_encoder = CodecSpeed(Codec.INT8_BLOCK64, 1e9, 0, 0, 0)  # a second to encode int8
    client = [s for s in REFERENCE_SPEEDS if s.codec is not Codec.INT8_BLOCK64] + [slow_encoder]
    choice = choose_session_codec(n_values=4096, bandwidth_bytes_per_s=SLOW.bandwidth_bytes_per_s,
                                  client=client, hop=REFERENCE_SPEEDS)
    assert choice.codec is Codec.INT8_BLOCK16  # the client encodes int8-block64 too slowly
    int8 = next(cost for cost in choice.costs if cost.codec is Codec.INT8_BLOCK64)
    assert int8.encode_s == pytest.approx(1.0 + REFERENCE_SPEEDS[3].encode_seconds(4096))
