"""WireTensor: everything checkable without building an array is checked on construction."""

from __future__ import annotations

import pytest

from protocol import Codec, InvalidTensor, TensorLimits, UnsupportedCodec, WireTensor
from protocol.errors import ErrorCode


def tensor_wire(**overrides: object) -> dict[str, object]:
    wire: dict[str, object] = {"dtype": "float32", "shape": [2, 3], "codec": 2, "data": b"\0" * 12}
    wire.update(overrides)
    return wire


def test_a_valid_map_becomes_a_tensor() -> None:
    tensor = WireTensor.from_wire(tensor_wire())
    assert tensor.shape == (2, 3) and tensor.codec is Codec.FP16 and tensor.numel == 6
    assert WireTensor.from_wire(tensor.to_wire()) == tensor


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"dtype": "float64"}, "dtype 'float64' is not one of"),
        ({"dtype": 3}, "dtype must be a string"),
        ({"shape": "2x3"}, "shape must be a list"),
        ({"shape": [2, -3]}, "not an int >= 0"),
        ({"shape": [2, True]}, "not an int >= 0"),
        ({"shape": [2, 3.0]}, "not an int >= 0"),
        ({"shape": [1] * 9}, "9 dims; the limit is 8"),
        ({"data": b"\0" * 11}, "needs 12 data bytes, got 11"),
        ({"data": "text"}, "data must be bytes"),
        ({"scales": b"\0\0"}, "needs 0 scale bytes, got 2"),
        ({"codec": 4, "data": b"\0" * 6}, "needs 2 scale bytes, got 0"),
        ({"codec": 4, "data": b"\0" * 5, "scales": b"\0\0"}, "needs 6 data bytes"),
    ],
)
def test_invalid_tensors_name_what_is_wrong(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidTensor, match=match) as caught:
        WireTensor.from_wire(tensor_wire(**overrides))
    assert caught.value.code in (ErrorCode.INVALID_TENSOR, ErrorCode.UNSUPPORTED_CODEC)


@pytest.mark.parametrize("codec", [0, 6, 16, 99, -1, "2", None, True, 2.0])
def test_unknown_codec_ids_are_unsupported(codec: object) -> None:
    with pytest.raises(UnsupportedCodec) as caught:
        WireTensor.from_wire(tensor_wire(codec=codec))
    assert caught.value.code is ErrorCode.UNSUPPORTED_CODEC


def test_shape_limits_are_checked_before_lengths() -> None:
    limits = TensorLimits(max_elements=100)
    huge = [1 << 40, 1 << 40, 1 << 40]
    with pytest.raises(InvalidTensor, match="elements; the limit is 100"):
        WireTensor.from_wire(tensor_wire(shape=huge), limits)
    with pytest.raises(InvalidTensor, match="elements; the limit is 100"):
        WireTensor.from_wire(tensor_wire(shape=[101]), limits)
    with pytest.raises(InvalidTensor, match="3 dims; the limit is 2"):
        WireTensor.from_wire(tensor_wire(shape=[1, 1, 1]), TensorLimits(max_ndim=2))


def test_zero_element_and_scalar_shapes() -> None:
    assert WireTensor.from_wire(tensor_wire(shape=[4, 0], data=b"")).numel == 0
    assert WireTensor.from_wire(tensor_wire(shape=[], data=b"\0\0")).numel == 1


def test_non_map_tensors_are_rejected() -> None:
    with pytest.raises(InvalidTensor, match="must be a map, got list"):
        WireTensor.from_wire([1, 2])


def test_codec_properties() -> None:
    assert Codec.INT8_BLOCK64_ZSTD.base is Codec.INT8_BLOCK64 and Codec.INT8_BLOCK64_ZSTD.zstd
    assert Codec.BF16_ZSTD.label == "bf16+zstd"
    assert Codec.INT8_BLOCK64.nominal_bytes_per_value == 1 + 2 / 64
    assert Codec.INT8_BLOCK16_ZSTD.block_size == 16 and Codec.INT8_BLOCK16.nominal_bytes_per_value == 1 + 2 / 16
    assert Codec.FP16.block_size == 0 and Codec.INT8_BLOCK16_ZSTD.label == "int8-block16+zstd"
    assert [int(c) for c in Codec] == [1, 2, 3, 4, 5, 17, 18, 19, 20, 21]  # stable wire ids


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_ndim 9"):
        TensorLimits(max_ndim=9)
