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
