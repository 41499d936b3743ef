"""Codecs: lossless ones are bit-exact, lossy ones stay within their stated bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from wire_strategies import PROTOCOL_PROFILE, float_arrays

from protocol import Codec, InvalidTensor, WireTensor, decode_tensor, encode_tensor
from protocol.tensors import ZSTD_FLAG
from protocol.codecs import (
    ZstdContext,
    bf16_bits_to_float32,
    float32_to_bf16_bits,
    quantize_int8_blockwise,
)

ZSTD = ZstdContext()


def roundtrip(array: np.ndarray, codec: Codec, **kwargs: object) -> np.ndarray:
    tensor = encode_tensor(array, codec, zstd_context=ZSTD, **kwargs)
    return decode_tensor(tensor, zstd_context=ZSTD)


def int8_bound(array: np.ndarray, block: int = 64) -> np.ndarray:
    """Per-value error bound of int8 blockwise: scale/2 with the scale rounded up to fp16."""
    flat = array.astype(np.float32).reshape(-1)
    padded = np.concatenate([flat, np.zeros(-flat.size % block, np.float32)]).reshape(-1, block)
    absmax = np.abs(padded).max(axis=1, initial=0.0)
    bound = absmax * (1 + 2.0**-10) / 254 * (1 + 1e-4) + 2.0**-25
    return np.repeat(bound, block)[: flat.size].reshape(array.shape)


@settings(PROTOCOL_PROFILE)
@given(float_arrays(np.float32), st.sampled_from([Codec.FP32, Codec.FP32_ZSTD]))
def test_fp32_is_bit_exact(array: np.ndarray, codec: Codec) -> None:
    decoded = roundtrip(array, codec)
    assert decoded.dtype == np.float32 and decoded.shape == array.shape
    assert decoded.tobytes() == array.tobytes()


@settings(PROTOCOL_PROFILE)
@given(float_arrays(np.float16), st.sampled_from([Codec.FP16, Codec.FP16_ZSTD, Codec.FP32]))
def test_float16_arrays_are_bit_exact_in_fp16_and_fp32(array: np.ndarray, codec: Codec) -> None:
    decoded = roundtrip(array, codec)
    assert decoded.dtype == np.float16
    assert decoded.tobytes() == array.tobytes()


@settings(PROTOCOL_PROFILE)
@given(float_arrays(np.float32), st.booleans())
def test_fp16_error_is_within_half_an_ulp(array: np.ndarray, zstd: bool) -> None:
    codec = Codec.FP16_ZSTD if zstd else Codec.FP16
    if array.size and np.abs(array).max() >= 65520:  # would be inf in fp16: refused
        with pytest.raises(InvalidTensor, match="overflows fp16"):
            encode_tensor(array, codec)
        return
    decoded = roundtrip(array, codec)
    error = np.abs(decoded.astype(np.float64) - array.astype(np.float64))
    assert (error <= np.maximum(np.abs(array) * 2.0**-11, 2.0**-25)).all()


@settings(PROTOCOL_PROFILE)
@given(float_arrays(np.float32), st.booleans())
def test_bf16_error_is_within_half_an_ulp(array: np.ndarray, zstd: bool) -> None:
    decoded = roundtrip(array, Codec.BF16_ZSTD if zstd else Codec.BF16, dtype="bfloat16")
    error = np.abs(decoded.astype(np.float64) - array.astype(np.float64))
    assert (error <= np.maximum(np.abs(array).astype(np.float64) * 2.0**-8, 2.0**-134)).all()


@settings(PROTOCOL_PROFILE)
@given(float_arrays(np.float32) | float_arrays(np.float16), st.booleans(),
       st.sampled_from([Codec.INT8_BLOCK64, Codec.INT8_BLOCK16]))
def test_int8_blockwise_error_is_within_half_a_scale(array: np.ndarray, zstd: bool, base: Codec) -> None:
    decoded = roundtrip(array, Codec(base | ZSTD_FLAG) if zstd else base)
    error = np.abs(decoded.astype(np.float64) - array.astype(np.float64))
    bound = int8_bound(array, base.block_size).astype(np.float64)
    if array.dtype == np.float16:  # decoded values are rounded to fp16 once more
        bound += np.abs(decoded).astype(np.float64) * 2.0**-11 + 2.0**-25
    assert (error <= bound).all()


@settings(PROTOCOL_PROFILE)
@given(hnp.arrays(np.uint32, st.integers(0, 300), elements=st.integers(0, 2**32 - 1)))
def test_bf16_rounding_matches_torch_bit_for_bit(bits: np.ndarray) -> None:
    values = bits.view(np.float32)
    magnitude = bits & 0x7FFFFFFF
    values = values[(magnitude < 0x7F7F8000) | (magnitude >= 0x7F800000)]  # no overflow
    ours = float32_to_bf16_bits(values)
    theirs = torch.from_numpy(values.copy()).to(torch.bfloat16).view(torch.int16).numpy()
    theirs = theirs.view(np.uint16)
    nan = np.isnan(values)
    assert (ours[~nan] == theirs[~nan]).all()
    assert np.isnan(bf16_bits_to_float32(ours[nan])).all()


def test_bf16_rounding_matches_torch_on_a_million_random_bit_patterns() -> None:
    bits = np.random.default_rng(7).integers(0, 2**32, 1_000_000, dtype=np.uint64)
    values = bits.astype(np.uint32).view(np.float32)
    magnitude = values.view(np.uint32) & 0x7FFFFFFF
    values = values[magnitude < 0x7F7F8000]
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert (float32_to_bf16_bits(values) == theirs).all()


def test_bf16_ties_round_to_even() -> None:
    below_tie = np.array([0x3F808000, 0x3F818000, 0xBF808000], np.uint32).view(np.float32)
    assert float32_to_bf16_bits(below_tie).tolist() == [0x3F80, 0x3F82, 0xBF80]


@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize("shape", [(), (0,), (1, 0, 64), (1, 1, 1), (3, 65), (2, 2, 128)])
def test_every_codec_handles_odd_shapes(codec: Codec, shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    decoded = roundtrip(array, codec)
    assert decoded.shape == shape and decoded.dtype == np.float32
    assert np.allclose(decoded, array, rtol=1e-2, atol=2e-2)


def test_int8_block64_wire_size_and_code_range() -> None:
    array = np.random.default_rng(2).standard_normal((1, 4, 4096)).astype(np.float32) * 5
    tensor = encode_tensor(array, Codec.INT8_BLOCK64)
    assert len(tensor.data) == array.size and len(tensor.scales) == array.size // 64 * 2
    assert tensor.wire_bytes / array.nbytes == pytest.approx(0.2578125)
    codes, scales = quantize_int8_blockwise(array)
    assert codes.min() >= -127 and codes.max() <= 127
    assert (np.abs(codes.reshape(-1, 64)).max(axis=1) >= 126).all()  # scale is not loose


@settings(PROTOCOL_PROFILE)
@given(float_arrays(np.float32), st.sampled_from([Codec.INT8_BLOCK64, Codec.INT8_BLOCK16]))
def test_int8_blockwise_reencoding_is_exact(array: np.ndarray, codec: Codec) -> None:
    """A client relaying a hop's output to the next hop adds no error by re-encoding it: exact for
    blocks whose scale is a normal fp16 (absmax >= 2**-14 * 127); below, the subnormal grid is too
    coarse for the rounded-up scale to keep a code at 127."""
    block = codec.block_size
    flat = np.abs(array.astype(np.float32).reshape(-1))
    absmax = np.concatenate([flat, np.zeros(-flat.size % block, np.float32)]).reshape(-1, block).max(axis=1, initial=0)
    assume(((absmax == 0) | (absmax >= 2.0**-14 * 127)).all())
    once = roundtrip(array, codec)
    assert roundtrip(once, codec).tobytes() == once.tobytes()


def test_int8_block16_wire_size() -> None:
    array = np.random.default_rng(3).standard_normal((1, 1, 4096)).astype(np.float32)
    tensor = encode_tensor(array, Codec.INT8_BLOCK16)
    assert len(tensor.data) == 4096 and len(tensor.scales) == 4096 // 16 * 2
    assert tensor.wire_bytes / array.nbytes == pytest.approx(0.28125)
    codes, _ = quantize_int8_blockwise(array, 16)
    assert (np.abs(codes.reshape(-1, 16)).max(axis=1) >= 126).all()


def test_int8_block64_keeps_tiny_and_zero_blocks() -> None:
    array = np.zeros(192, np.float32)
    array[64:128] = 1e-9  # scale below fp16's smallest subnormal: rounded up to it
    array[128:] = np.linspace(-3e-5, 3e-5, 64)
    decoded = roundtrip(array, Codec.INT8_BLOCK64)
    assert (decoded[:64] == 0).all()
    assert (np.abs(decoded - array) <= int8_bound(array)).all()


@pytest.mark.parametrize("codec", [Codec.INT8_BLOCK64, Codec.FP16, Codec.BF16])
def test_encoders_refuse_values_they_cannot_carry(codec: Codec) -> None:
    huge = {Codec.INT8_BLOCK64: 1e7, Codec.FP16: 65520.0, Codec.BF16: 3.4e38}[codec]
    array = np.ones(100, np.float32)
    array[70] = huge
    with pytest.raises(InvalidTensor, match="index 70|block 1"):
        encode_tensor(array, codec)


def test_int8_refuses_non_finite_values() -> None:
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(InvalidTensor, match="non-finite"):
            encode_tensor(np.array([1.0, bad], np.float32), Codec.INT8_BLOCK64)


@pytest.mark.parametrize("codec", [Codec.FP32, Codec.FP16, Codec.BF16, Codec.BF16_ZSTD])
def test_non_finite_values_travel_only_when_allowed(codec: Codec) -> None:
    array = np.array([1.0, np.nan, -np.inf, np.inf, 2.0], np.float32)
    tensor = encode_tensor(array, codec)
    with pytest.raises(InvalidTensor, match="3 non-finite values"):
        decode_tensor(tensor)
    decoded = decode_tensor(tensor, allow_nonfinite=True)
    assert np.isnan(decoded[1]) and decoded[2] == -np.inf and decoded[3] == np.inf


def test_int8_scales_that_are_not_finite_are_rejected() -> None:
    good = encode_tensor(np.ones(64, np.float32), Codec.INT8_BLOCK64)
    bad = WireTensor(dtype="float32", shape=(64,), codec=Codec.INT8_BLOCK64, data=good.data,
                     scales=np.array([np.inf], np.float16).tobytes())
    with pytest.raises(InvalidTensor, match="non-finite"):
        decode_tensor(bad)


def test_float16_dtype_saturates_instead_of_overflowing() -> None:
    array = np.array([65504.0, -65504.0, 1.0], np.float16)
    decoded = roundtrip(array, Codec.INT8_BLOCK64)
    assert decoded.dtype == np.float16 and np.isfinite(decoded).all()


def test_encode_refuses_other_dtypes_and_mismatched_dtype() -> None:
    with pytest.raises(InvalidTensor, match="float32 or float16"):
        encode_tensor(np.ones(4, np.float64), Codec.FP32)
    with pytest.raises(InvalidTensor, match="needs a float16 array"):
        encode_tensor(np.ones(4, np.float32), Codec.FP16, dtype="float16")


def test_decoded_arrays_are_writable() -> None:
    for codec in Codec:
        assert roundtrip(np.ones((2, 64), np.float32), codec).flags.writeable


def _zstd_tensor(data: bytes, shape: tuple[int, ...] = (100,)) -> WireTensor:
    return WireTensor(dtype="float32", shape=shape, codec=Codec.FP16_ZSTD, data=data)


def test_zstd_frames_that_lie_are_rejected() -> None:
    honest = ZSTD.compress(np.ones(100, np.float16).tobytes())
    assert decode_tensor(_zstd_tensor(honest)).tolist() == [1.0] * 100
    with pytest.raises(InvalidTensor, match="declares 200 bytes"):
        _zstd_tensor(honest, shape=(50,))
    with pytest.raises(InvalidTensor, match="not a zstd frame"):
        _zstd_tensor(b"\x00" * 20)
    with pytest.raises(InvalidTensor, match="trailing"):
        decode_tensor(_zstd_tensor(honest + b"junk"))
    with pytest.raises(InvalidTensor, match="zstd"):
        decode_tensor(_zstd_tensor(honest[:-4]))
    unsized = __import__("zstandard").ZstdCompressor(write_content_size=False).compress(b"x" * 200)
    with pytest.raises(InvalidTensor):
        _zstd_tensor(unsized)


@pytest.mark.parametrize("codec", [Codec.FP32, Codec.FP16, Codec.BF16, Codec.FP16_ZSTD])
def test_a_decoded_tensor_is_passed_on_as_it_came_where_encoding_again_gives_the_same_values(codec: Codec) -> None:
    array = np.random.default_rng(5).standard_normal((1, 1, 256)).astype(np.float32)
    received = encode_tensor(array, codec, zstd_context=ZSTD)
    values = decode_tensor(received, zstd_context=ZSTD)
    assert encode_tensor(values, codec, decoded_from=received) is received
    assert decode_tensor(encode_tensor(values, codec, zstd_context=ZSTD), zstd_context=ZSTD).tobytes() == values.tobytes()


def test_a_decoded_tensor_is_encoded_again_for_another_codec_dtype_or_a_lossy_codec() -> None:
    array = np.random.default_rng(6).standard_normal((1, 1, 256)).astype(np.float32)
    fp16 = encode_tensor(array, Codec.FP16)
    values = decode_tensor(fp16)
    assert encode_tensor(values, Codec.FP32, decoded_from=fp16).codec is Codec.FP32
    assert encode_tensor(values.astype(np.float16), Codec.FP16, decoded_from=fp16).dtype == "float16"
    int8 = encode_tensor(array, Codec.INT8_BLOCK64)
    assert encode_tensor(decode_tensor(int8), Codec.INT8_BLOCK64, decoded_from=int8) is not int8
