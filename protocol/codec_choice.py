"""Adaptive codec choice: a pure function of a link's bandwidth and the peers' codec speeds.

Per message of `n_values` activations sent from one peer to another, a codec costs

    encode(sender) + wire_bytes / bandwidth + decode(receiver)

where each peer's speed for a codec is a linear model (`CodecSpeed`: fixed nanoseconds plus
nanoseconds per value) that the peer measures and announces in its `Hello`. `choose_codec` picks
the cheapest codec both peers support whose stated error bound fits the accuracy budget. Wire
bytes default to each codec's nominal size; zstd variants only win when the sender passes a
measured `wire_bytes_per_value` showing that zstd actually shrinks its activations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from protocol.errors import InvalidMessage
from protocol.tensors import Codec

# Worst-case error of one value, relative to the largest magnitude in its block (int8 blockwise)
# or to the value itself (float codecs): half an ulp, plus fp16 rounding of the int8 scale.
CODEC_ERROR_BOUND: Mapping[Codec, float] = {
    Codec.FP32: 0.0,
    Codec.FP16: 2.0**-11,
    Codec.BF16: 2.0**-8,
    Codec.INT8_BLOCK64: (1 + 2.0**-10) / 254,
    Codec.INT8_BLOCK16: (1 + 2.0**-10) / 254,
}
DEFAULT_ERROR_BUDGET = 5e-3  # admits bf16 and the int8 blockwise codecs


def error_bound(codec: Codec) -> float:
    """The stated per-value error bound of a codec (zstd is lossless and changes nothing)."""
    return CODEC_ERROR_BOUND[Codec(codec).base]


@dataclass(frozen=True)
class CodecSpeed:
    """One peer's measured cost of a codec: `fixed + per_value * n` nanoseconds each way."""

    codec: Codec
    encode_fixed_ns: float
    encode_ns_per_value: float
    decode_fixed_ns: float
    decode_ns_per_value: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "codec", Codec(self.codec))
        for name in ("encode_fixed_ns", "encode_ns_per_value", "decode_fixed_ns",
                     "decode_ns_per_value"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
                raise InvalidMessage(f"codec speed {name} must be a finite float >= 0, "
                                     f"got {value!r}")
            object.__setattr__(self, name, float(value))

    def encode_seconds(self, n_values: int) -> float:
        return (self.encode_fixed_ns + self.encode_ns_per_value * n_values) * 1e-9

    def decode_seconds(self, n_values: int) -> float:
        return (self.decode_fixed_ns + self.decode_ns_per_value * n_values) * 1e-9

    def to_wire(self) -> list[float | int]:
        return [int(self.codec), self.encode_fixed_ns, self.encode_ns_per_value,
                self.decode_fixed_ns, self.decode_ns_per_value]

    @classmethod
    def from_wire(cls, wire: object) -> CodecSpeed | None:
        """The speed, or None for a codec id this version does not know (ignored)."""
        if not isinstance(wire, list) or len(wire) != 5 or type(wire[0]) is not int:
            raise InvalidMessage(f"a codec speed must be [codec, 4 floats], got {wire!r:.80}")
        if wire[0] not in Codec._value2member_map_:
            return None
        return cls(Codec(wire[0]), *wire[1:])


@dataclass(frozen=True)
class CodecCost:
    """Estimated seconds one message takes over one hop with one codec."""

    codec: Codec
    encode_s: float
    transfer_s: float
    decode_s: float
    wire_bytes: float

    @property
    def total_s(self) -> float:
        return self.encode_s + self.transfer_s + self.decode_s


@dataclass(frozen=True)
class CodecChoice:
    codec: Codec
    costs: tuple[CodecCost, ...]  # every admissible codec, cheapest first


def choose_codec(
    *,
    n_values: int,
    bandwidth_bytes_per_s: float,
    sender: Iterable[CodecSpeed],
    receiver: Iterable[CodecSpeed],
    error_budget: float = DEFAULT_ERROR_BUDGET,
    wire_bytes_per_value: Mapping[Codec, float] | None = None,
) -> CodecChoice:
    """The codec minimising encode + transfer + decode time for one message on one link.

    Candidates are the codecs with a speed from both peers and an error bound within
    `error_budget`. Ties go to the lower codec id, so the answer is deterministic.
    """
    if n_values < 0 or not bandwidth_bytes_per_s > 0:
        raise ValueError(f"need n_values >= 0 and bandwidth > 0, got {n_values}, "
                         f"{bandwidth_bytes_per_s}")
    encoders = {speed.codec: speed for speed in sender}
    decoders = {speed.codec: speed for speed in receiver}
    sizes = dict(wire_bytes_per_value or {})
    costs = []
    for codec in sorted(encoders.keys() & decoders.keys()):
        if error_bound(codec) > error_budget:
            continue
        wire = n_values * sizes.get(codec, codec.nominal_bytes_per_value)
        costs.append(CodecCost(
            codec=codec,
            encode_s=encoders[codec].encode_seconds(n_values),
            transfer_s=wire / bandwidth_bytes_per_s,
            decode_s=decoders[codec].decode_seconds(n_values),
            wire_bytes=wire,
        ))
    if not costs:
        raise ValueError(f"no codec both peers support fits the error budget {error_budget}")
    costs.sort(key=lambda cost: (cost.total_s, cost.codec))
    return CodecChoice(codec=costs[0].codec, costs=tuple(costs))


# --- a session's codec --------------------------------------------------------------------------

# What a peer announces when it has not measured itself (a documented estimate): decode-step
# encode/decode microseconds at 512 and 4096 values, from bench_codecs in benchmarks/RESULTS.md
# ("Wire codecs", torch 2.13 on CPU, 2 threads), fitted as fixed + per-value costs. Only the base
# codecs: zstd pays only where measured bytes show that it shrinks the activations.
_REFERENCE_TIMINGS_US: Mapping[Codec, tuple[tuple[float, float], tuple[float, float]]] = {
    #                     (encode, decode) at 512 values, at 4096 values
    Codec.FP32: ((5.1, 2.8), (5.9, 3.9)),
    Codec.FP16: ((11.0, 3.8), (22.8, 11.7)),
    Codec.BF16: ((17.6, 5.8), (23.6, 7.8)),
    Codec.INT8_BLOCK64: ((26.0, 6.6), (38.2, 8.7)),
    Codec.INT8_BLOCK16: ((29.9, 6.2), (48.9, 9.8)),
}


def _fitted(codec: Codec, small: tuple[float, float], large: tuple[float, float]) -> CodecSpeed:
    per_value = [(b - a) * 1e3 / (4096 - 512) for a, b in zip(small, large)]  # ns per value
    fixed = [a * 1e3 - per * 512 for a, per in zip(small, per_value)]
    return CodecSpeed(codec, fixed[0], per_value[0], fixed[1], per_value[1])


REFERENCE_SPEEDS: tuple[CodecSpeed, ...] = tuple(
    _fitted(codec, *timings) for codec, timings in _REFERENCE_TIMINGS_US.items())

DEFAULT_CODEC = Codec.FP16  # what a session uses until a link is known to be slow
# A session leaves DEFAULT_CODEC only for a codec that saves at least this much per step (both ways):
# below it the gain is within the noise of a measured link, and fp16's error is 8x below int8's.
MIN_SAVING_S = 1e-4


def choose_session_codec(
    *,
    n_values: int,
    bandwidth_bytes_per_s: float,
    client: Iterable[CodecSpeed],
    hop: Iterable[CodecSpeed],
    error_budget: float = DEFAULT_ERROR_BUDGET,
    default: Codec = DEFAULT_CODEC,
    min_saving_s: float = MIN_SAVING_S,
) -> CodecChoice:
    """The codec for one session's steps, both ways (`n_values` each way: the client encodes what
    the hop decodes, and back): the cheapest by `choose_codec`'s costs summed over both directions,
    unless it saves less than `min_saving_s` over `default` (when `default` is a candidate)."""
    client, hop = tuple(client), tuple(hop)
    to_hop = choose_codec(n_values=n_values, bandwidth_bytes_per_s=bandwidth_bytes_per_s, sender=client,
                          receiver=hop, error_budget=error_budget)
    to_client = {cost.codec: cost for cost in choose_codec(
        n_values=n_values, bandwidth_bytes_per_s=bandwidth_bytes_per_s, sender=hop, receiver=client,
        error_budget=error_budget).costs}
    costs = sorted((CodecCost(out.codec, out.encode_s + back.encode_s, out.transfer_s + back.transfer_s,
                              out.decode_s + back.decode_s, out.wire_bytes + back.wire_bytes)
                    for out in to_hop.costs if (back := to_client.get(out.codec)) is not None),
                   key=lambda cost: (cost.total_s, cost.codec))
    by_codec = {cost.codec: cost for cost in costs}
    chosen = costs[0].codec
    if default in by_codec and by_codec[default].total_s - costs[0].total_s < min_saving_s:
        chosen = default
    return CodecChoice(codec=chosen, costs=tuple(costs))
