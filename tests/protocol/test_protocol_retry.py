"""What an error means for a request: one table, read the same way by client and node."""

from __future__ import annotations

import pytest

from protocol import Error, ErrorCode, Retry, classify
from protocol.retry import RETRY, retry_elsewhere


def test_every_code_has_a_meaning():
    assert set(RETRY) == set(ErrorCode)


@pytest.mark.parametrize(("code", "retry"), [
    (ErrorCode.CACHE_FULL, Retry.BUSY), (ErrorCode.OVERLOADED, Retry.BUSY),
    (ErrorCode.SPAN_NOT_SERVED, Retry.ELSEWHERE), (ErrorCode.SHUTTING_DOWN, Retry.ELSEWHERE),
    (ErrorCode.SESSION_EXPIRED, Retry.ELSEWHERE), (ErrorCode.MODEL_MISMATCH, Retry.ELSEWHERE),
    (ErrorCode.INTERNAL_ERROR, Retry.ELSEWHERE), (ErrorCode.INVALID_TENSOR, Retry.FATAL),
    (ErrorCode.POSITION_MISMATCH, Retry.FATAL), (ErrorCode.UNEXPECTED_MESSAGE, Retry.FATAL),
])
def test_a_code_and_the_error_a_node_sends_for_it_agree(code, retry):
    assert classify(code) is retry
    assert classify(Error(code=code, reason="", retry_elsewhere=retry_elsewhere(code))) is retry
    assert retry.retry_elsewhere is (retry is not Retry.FATAL) and retry.busy is (retry is Retry.BUSY)


def test_a_node_that_says_not_elsewhere_is_final_whatever_the_code():
    """An allow-list refusal is OVERLOADED with retry_elsewhere=False: no use waiting for room."""
    assert classify(Error(code=ErrorCode.OVERLOADED, reason="not on the allow-list")) is Retry.FATAL


def test_an_unknown_code_is_read_from_the_hint():
    assert classify(Error(code=999, reason="", retry_elsewhere=True)) is Retry.ELSEWHERE
    assert classify(Error(code=999, reason="", retry_elsewhere=False)) is Retry.FATAL
