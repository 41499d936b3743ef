"""The conversation between a client and one hop, as a transitions table (after h11).

One session lives on one stream. Both ends run the same `SessionMachine`; each feeds it the
messages it sends (`send`) and receives (`receive`). The table says which sender may send which
message in which state and where that leads:

    state      sender  message        -> next
    NEW        client  Hello          -> GREETED
    GREETED    hop     Hello          -> IDLE       (the handshake: Hello both ways, client first)
    IDLE       hop     SpanInfo       -> IDLE       (info streams: what the node serves)
    IDLE       client  OpenSession    -> OPENING
    OPENING    hop     SessionOpened  -> OPEN
    OPEN       client  Step           -> STEPPING
    STEPPING   hop     StepResult     -> OPEN
    OPEN       client  CloseSession   -> CLOSED
    IDLE       client  ManifestRequest -> FETCHING  (pieces streams: a model's manifest and holdings,
    FETCHING   hop     ManifestData   -> IDLE        then its pieces, one request at a time)
    IDLE       client  PieceRequest   -> FETCHING
    FETCHING   hop     PieceData      -> IDLE
    IDLE       client  DialBackRequest -> CHECKING  (reach streams: the peer dials the client back)
    CHECKING   hop     DialBackResult -> IDLE
    (any but CLOSED)  either  Error   -> ERRORED
    (NEW .. CHECKING)  either  Ping, Pong -> unchanged (liveness needs no handshake)

Once both Hellos have passed, `agreement` holds what they agree on (`protocol.conversation`:
common codecs and their speeds, common capabilities). Besides the table: every session message
must name the session the `OpenSession` named, step numbers must increase, and a `StepResult`
must answer the step in flight. Anything else raises `LocalProtocolError` (from `send`) or
`RemoteProtocolError` (from `receive`), and the machine moves to ERRORED; from there only `Error`
messages pass (to tell the peer why).
"""

from __future__ import annotations

import enum

from protocol.conversation import Agreement, negotiate
from protocol.errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.piece_messages import ManifestData, ManifestRequest, PieceData, PieceRequest
from protocol.reach_messages import DialBackRequest, DialBackResult
from protocol.messages import (
    CloseSession,
    Error,
    Hello,
    Message,
    OpenSession,
    Ping,
    Pong,
    SessionOpened,
    SpanInfo,
    Step,
    StepResult,
)


class Role(enum.Enum):
    CLIENT = "client"
    HOP = "hop"

    @property
    def peer(self) -> Role:
        return Role.HOP if self is Role.CLIENT else Role.CLIENT


class State(enum.Enum):
    NEW = "new"
    GREETED = "greeted"
    IDLE = "idle"
    OPENING = "opening"
    OPEN = "open"
    STEPPING = "stepping"
    FETCHING = "fetching"  # pieces protocol: a manifest or piece request in flight
    CHECKING = "checking"  # reach protocol: a dial-back request in flight
    CLOSED = "closed"
    ERRORED = "errored"


CLIENT, HOP = Role.CLIENT, Role.HOP

TRANSITIONS: dict[tuple[State, Role, type[Message]], State] = {
    (State.NEW, CLIENT, Hello): State.GREETED,
    (State.GREETED, HOP, Hello): State.IDLE,
    (State.IDLE, HOP, SpanInfo): State.IDLE,
    (State.IDLE, CLIENT, OpenSession): State.OPENING,
    (State.OPENING, HOP, SessionOpened): State.OPEN,
    (State.OPEN, CLIENT, Step): State.STEPPING,
    (State.STEPPING, HOP, StepResult): State.OPEN,
    (State.OPEN, CLIENT, CloseSession): State.CLOSED,
    # the pieces protocol (PIECES_PROTOCOL): requests one at a time after the Hellos
    (State.IDLE, CLIENT, ManifestRequest): State.FETCHING,
    (State.FETCHING, HOP, ManifestData): State.IDLE,
    (State.IDLE, CLIENT, PieceRequest): State.FETCHING,
    (State.FETCHING, HOP, PieceData): State.IDLE,
    # the reach protocol (REACH_PROTOCOL): one dial-back request at a time after the Hellos
    (State.IDLE, CLIENT, DialBackRequest): State.CHECKING,
    (State.CHECKING, HOP, DialBackResult): State.IDLE,
}
LIVE_STATES = frozenset({State.NEW, State.GREETED, State.IDLE, State.OPENING, State.OPEN, State.STEPPING,
                         State.FETCHING, State.CHECKING})
LIVENESS_MESSAGES = (Ping, Pong)  # allowed in LIVE_STATES, either way


class SessionMachine:
    """One end's view of a session: the state, the session id and the step in flight."""

    def __init__(self, role: Role):
        self.role = role
        self.state = State.NEW
        self.session_id: str | None = None
        self.last_step: int | None = None
        self.hellos: dict[Role, Hello] = {}  # each side's Hello, once sent
        self.agreement: Agreement | None = None  # what the two Hellos agree on, once both passed

    def send(self, message: Message) -> None:
        """Record a message we are about to send; `LocalProtocolError` if it is not allowed."""
        self._process(self.role, message, LocalProtocolError)

    def receive(self, message: Message) -> None:
        """Record a message the peer sent; `RemoteProtocolError` if it is not allowed."""
        self._process(self.role.peer, message, RemoteProtocolError)

    def _process(
        self, sender: Role, message: Message, error: type[ProtocolError]
    ) -> None:
        try:
            next_state = self._next_state(sender, message)
            self._check_consistency(message)
        except _Violation as violation:
            self.state = State.ERRORED
            raise error(
                f"{sender.value} may not send {type(message).__name__} here: {violation}",
                code=ErrorCode.UNEXPECTED_MESSAGE,
            ) from None
        self._advance(message, next_state)

    def _next_state(self, sender: Role, message: Message) -> State:
        if isinstance(message, Error):
            if self.state is State.CLOSED:
                raise _Violation("the session is closed")
            return State.ERRORED
        if isinstance(message, LIVENESS_MESSAGES):
            if self.state not in LIVE_STATES:
                raise _Violation(f"the session is {self.state.value}")
            return self.state
        next_state = TRANSITIONS.get((self.state, sender, type(message)))
        if next_state is None:
            awaited = {State.NEW: "; the client's Hello comes first",
                       State.GREETED: "; the hop's Hello comes next"}.get(self.state, "")
            raise _Violation(f"state is {self.state.value}{awaited}")
        return next_state

    def _check_consistency(self, message: Message) -> None:
        session_id = getattr(message, "session_id", "")
        if self.session_id is not None and session_id and session_id != self.session_id:
            raise _Violation(f"session id {session_id!r} is not this session's "
                             f"{self.session_id!r}")
        if isinstance(message, Step) and self.last_step is not None \
                and message.step <= self.last_step:
            raise _Violation(f"step {message.step} does not follow step {self.last_step}")
        if isinstance(message, StepResult) and message.step != self.last_step:
            raise _Violation(f"result for step {message.step} while step {self.last_step} "
                             f"is in flight")

    def _advance(self, message: Message, next_state: State) -> None:
        if isinstance(message, Hello):
            self.hellos[CLIENT if self.state is State.NEW else HOP] = message
            if len(self.hellos) == 2:
                self.agreement = negotiate(self.hellos[CLIENT], self.hellos[HOP])
        elif isinstance(message, OpenSession):
            self.session_id = message.session_id
        elif isinstance(message, Step):
            self.last_step = message.step
        self.state = next_state


class _Violation(Exception):
    """Internal: why a message is not allowed; turned into Local/RemoteProtocolError."""
