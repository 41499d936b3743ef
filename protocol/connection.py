"""`Connection`: one end of one session's stream, sans-IO, with h11's API.

    conn = Connection(Role.CLIENT)
    stream_bytes = conn.send(Hello(...))            # validate against the state, encode
    conn.receive_data(bytes_from_the_stream)        # b"" is fine; nothing is parsed yet
    while (message := conn.next_event()) is not None:
        ...

It joins a `FrameDecoder` and a `SessionMachine`. Whatever goes wrong while sending raises
`LocalProtocolError`; whatever the peer got wrong raises `RemoteProtocolError`. Both keep the
specific error (`FrameTooLarge`, `InvalidTensor`, ...) as `__cause__` and copy its `code`, which
is what an `Error` reply should carry. After either, the session is ERRORED and `send` accepts
only `Error`.
"""

from __future__ import annotations

from protocol.conversation import Agreement
from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, encode
from protocol.messages import Message
from protocol.session import Role, SessionMachine, State
from protocol.tensors import DEFAULT_LIMITS, TensorLimits


class Connection:
    def __init__(
        self,
        role: Role,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        peer_max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        tensor_limits: TensorLimits = DEFAULT_LIMITS,
    ):
        self.machine = SessionMachine(role)
        self.decoder = FrameDecoder(max_frame_bytes, tensor_limits=tensor_limits)
        self.peer_max_frame_bytes = peer_max_frame_bytes

    @property
    def role(self) -> Role:
        return self.machine.role

    @property
    def state(self) -> State:
        return self.machine.state

    @property
    def agreement(self) -> Agreement | None:
        """What both Hellos agree on, once both have passed (`protocol.conversation.negotiate`)."""
        return self.machine.agreement

    def send(self, message: Message) -> bytes:
        """The bytes to write for `message`; `LocalProtocolError` if it may not be sent."""
        try:
            frame = encode(message, max_frame_bytes=self.peer_max_frame_bytes)
        except ProtocolError as err:
            self.machine.state = State.ERRORED
            raise LocalProtocolError(str(err), code=err.code) from err
        self.machine.send(message)
        return frame

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes read from the stream; messages come out of `next_event`."""
        try:
            self.decoder.receive_data(data)
        except ProtocolError as err:
            self.machine.state = State.ERRORED
            raise RemoteProtocolError(str(err), code=err.code) from err

    def next_event(self) -> Message | None:
        """The next message the peer sent, or None until more bytes arrive."""
        try:
            message = self.decoder.next_message()
        except ProtocolError as err:
            self.machine.state = State.ERRORED
            raise RemoteProtocolError(str(err), code=err.code) from err
        if message is not None:
            self.machine.receive(message)
        return message
