"""What an error means for the request: go elsewhere, come back when the peer has room, or give up.

One table, `RETRY`, says for each `ErrorCode` what a client should do when a node answers with it,
and `classify` reads it:

- `Retry.ELSEWHERE`: this peer cannot serve the request now (it does not hold those blocks, lost
  the session, is shutting down, failed inside); another peer can. The client bans the peer and
  replays the hop's history on a replacement.
- `Retry.BUSY`: the peer is healthy but full (session slots, KV cache): go elsewhere now, and ask it
  again soon (its ban is short): the "retry here" case.
- `Retry.FATAL`: the request itself is wrong (a protocol violation, a length or position no node
  accepts); sending it elsewhere fails the same way.

A node tells its client with the code and `Error.retry_elsewhere`, whose default is the table's
(`retry_elsewhere(code)`). A node may refuse for a reason only it knows (its allow-list) with
`retry_elsewhere=False`; `classify` of such an `Error` is FATAL whatever the code. A code this
version does not know is read from the hint alone.
"""

from __future__ import annotations

import enum

from protocol.errors import ErrorCode
from protocol.messages import Error


class Retry(enum.Enum):
    ELSEWHERE = "elsewhere"
    BUSY = "busy"
    FATAL = "fatal"

    @property
    def retry_elsewhere(self) -> bool:
        return self is not Retry.FATAL

    @property
    def busy(self) -> bool:
        return self is Retry.BUSY


RETRY: dict[ErrorCode, Retry] = {
    ErrorCode.MALFORMED_FRAME: Retry.FATAL,
    ErrorCode.FRAME_TOO_LARGE: Retry.FATAL,
    ErrorCode.UNSUPPORTED_VERSION: Retry.FATAL,
    ErrorCode.UNKNOWN_MESSAGE_TYPE: Retry.FATAL,
    ErrorCode.INVALID_MESSAGE: Retry.FATAL,
    ErrorCode.INVALID_TENSOR: Retry.FATAL,
    ErrorCode.UNSUPPORTED_CODEC: Retry.FATAL,
    ErrorCode.UNEXPECTED_MESSAGE: Retry.FATAL,
    ErrorCode.UNKNOWN_SESSION: Retry.ELSEWHERE,
    ErrorCode.MODEL_MISMATCH: Retry.ELSEWHERE,
    ErrorCode.SPAN_NOT_SERVED: Retry.ELSEWHERE,
    ErrorCode.CACHE_FULL: Retry.BUSY,
    ErrorCode.SESSION_EXPIRED: Retry.ELSEWHERE,
    ErrorCode.OVERLOADED: Retry.BUSY,
    ErrorCode.POSITION_MISMATCH: Retry.FATAL,
    ErrorCode.SHUTTING_DOWN: Retry.ELSEWHERE,
    ErrorCode.INTERNAL_ERROR: Retry.ELSEWHERE,
    ErrorCode.PIECE_NOT_HELD: Retry.ELSEWHERE,
    ErrorCode.DIAL_BACK_REFUSED: Retry.ELSEWHERE,  # ask another peer
}


def classify(error: Error | ErrorCode) -> Retry:
    """What to do about `error`: a code by the table; an `Error` from a peer by its code, unless
    the peer said not to retry elsewhere (then FATAL) or sent a code this version does not know
    (then its hint alone: ELSEWHERE or FATAL)."""
    if isinstance(error, ErrorCode):
        return RETRY[error]
    if not error.retry_elsewhere:
        return Retry.FATAL
    known = RETRY.get(error.code) if isinstance(error.code, ErrorCode) else None
    return Retry.BUSY if known is Retry.BUSY else Retry.ELSEWHERE


def retry_elsewhere(code: ErrorCode) -> bool:
    """The hint a node puts in its `Error` for `code` (`Error.retry_elsewhere`)."""
    return RETRY[code].retry_elsewhere
