"""Hypothesis strategies for protocol messages and activation arrays, shared by the tests."""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocol import (
    CloseSession,
    Codec,
    CodecSpeed,
    Error,
    ErrorCode,
    Hello,
    OpenSession,
    Ping,
    Pong,
    SessionOpened,
    ManifestData,
    DialBackRequest,
    DialBackResult,
    ManifestRequest,
    PieceData,
    PieceRequest,
    SpanInfo,
    Step,
    StepResult,
    encode_tensor,
)

PROTOCOL_PROFILE = settings.get_profile("hearth-protocol")

ids = st.text(min_size=1, max_size=40)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
rates = st.floats(0, 1e9, allow_nan=False, allow_infinity=False)
codecs = st.sampled_from(list(Codec))

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=70).filter(
    lambda shape: np.prod(shape) <= 20_000
)


def float_arrays(dtype: type = np.float32, bound: float = 1e6) -> st.SearchStrategy:
    """Arrays of finite values within +-bound (and within fp16's range for float16)."""
    bound = min(bound, 60000.0) if dtype == np.float16 else bound
    elements = st.floats(-bound, bound, width=32 if dtype == np.float32 else 16,
                         allow_nan=False, allow_infinity=False)
    return hnp.arrays(dtype, shapes, elements=elements)


@st.composite
def hidden_states(draw: st.DrawFn) -> object:
    """Encoded [batch, tokens, hidden] tensors in any codec."""
    shape = draw(hnp.array_shapes(min_dims=3, max_dims=3, min_side=0, max_side=70)
                 .filter(lambda shape: np.prod(shape) <= 20_000))
    dtype = draw(st.sampled_from((np.float32, np.float16)))
    # Within fp16's range, so that every codec can carry the values.
    elements = st.floats(-60000, 60000, width=32 if dtype == np.float32 else 16)
    array = draw(hnp.arrays(dtype, shape, elements=elements))
    codec = draw(codecs)
    dtype = draw(st.sampled_from((None, "bfloat16"))) if array.dtype == np.float32 else None
    return encode_tensor(array, codec, dtype=dtype)


codec_speeds = st.builds(CodecSpeed, codecs, rates, rates, rates, rates)

messages = st.one_of(
    st.builds(Hello, software=st.text(max_size=20),
              capabilities=st.lists(st.text(min_size=1, max_size=10), max_size=5).map(tuple),
              codecs=st.lists(codecs, max_size=8).map(tuple),
              codec_speeds=st.lists(codec_speeds, max_size=4).map(tuple),
              max_frame_bytes=st.integers(1, 2**32 - 1),
              swarm_proof=st.one_of(st.just(b""), st.binary(min_size=32, max_size=32))),
    st.builds(lambda start, length, **kw: SpanInfo(start=start, end=start + length, **kw),
              start=st.integers(0, 1000), length=st.integers(1, 1000), model_id=ids,
              manifest_hash=ids, quantization=st.sampled_from(("none", "int8", "int4-g64")),
              throughput=rates, free_cache_tokens=u64, sessions=st.integers(0, 2**32 - 1),
              kernels=st.text(max_size=64)),
    st.builds(lambda start, length, **kw: OpenSession(start=start, end=start + length, **kw),
              start=st.integers(0, 1000), length=st.integers(1, 1000), session_id=ids,
              model_id=ids, manifest_hash=ids, max_length=st.integers(1, 2**32 - 1),
              batch_size=st.integers(1, 65536), codec=codecs),
    st.builds(SessionOpened, session_id=ids),
    st.builds(SessionOpened, session_id=ids, data_address=st.just("127.0.0.1:4001"),
              data_token=st.binary(min_size=16, max_size=16), data_key=st.binary(min_size=32, max_size=32)),
    st.builds(Step, session_id=ids, step=u64, start_position=u32, hidden=hidden_states(),
              replay=st.booleans()),
    st.builds(StepResult, session_id=ids, step=u64, hidden=hidden_states(),
              compute_seconds=rates, before_compute_seconds=rates, after_compute_seconds=rates),
    st.builds(CloseSession, session_id=ids),
    st.builds(Error, code=st.sampled_from(list(ErrorCode)) | st.integers(0, 0xFFFF),
              reason=st.text(max_size=100), retry_elsewhere=st.booleans(),
              session_id=st.text(max_size=20)),
    st.builds(Ping, nonce=u64),
    st.builds(Pong, nonce=u64),
    st.builds(ManifestRequest, manifest_hash=ids, bitmaps_only=st.booleans()),
    st.builds(ManifestData, manifest_hash=ids, manifest=st.binary(max_size=200),
              have=st.lists(st.binary(max_size=8), max_size=4).map(tuple)),
    st.builds(PieceRequest, manifest_hash=ids, path=ids, index=u32),
    st.builds(PieceData, manifest_hash=ids, path=ids, index=u32, data=st.binary(max_size=200)),
    st.builds(DialBackRequest, addrs=st.lists(ids, min_size=1, max_size=4).map(tuple)),
    st.builds(DialBackResult, reached=st.lists(st.booleans(), max_size=4).map(tuple), observed=st.text(max_size=40)),
)
