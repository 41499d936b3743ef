"""An echo hop over libp2p, and a process that serves it until killed (for kill/freeze tests).

Run as `python -m tests.mesh.echo_peer`: prints its full multiaddr on one line, then serves
`ECHO` until it is killed.
"""

from __future__ import annotations

import trio

from mesh.errors import StreamClosed
from mesh.transport import ByteStream, MessageStream
from protocol import CloseSession, Hello, OpenSession, Ping, Pong, Role, SessionOpened, Step, StepResult

ECHO = "/hearth/test-echo/1"
IO_TIMEOUT = 10.0


async def echo_hop(raw: ByteStream) -> None:
    """Answers Ping with Pong and plays a hop (Hello back, then a session) that returns each step's
    hidden states unchanged."""
    stream = MessageStream(raw, Role.HOP, io_timeout=IO_TIMEOUT)
    while True:
        try:
            message = await stream.receive()
        except StreamClosed:
            return
        if isinstance(message, Ping):
            await stream.send(Pong(nonce=message.nonce))
        elif isinstance(message, Hello):
            await stream.send(Hello(software="echo"))
        elif isinstance(message, OpenSession):
            await stream.send(SessionOpened(session_id=message.session_id))
        elif isinstance(message, Step):
            await stream.send(StepResult(session_id=message.session_id, step=message.step, hidden=message.hidden))
        elif isinstance(message, CloseSession):
            await raw.aclose()
            return


async def serve_forever() -> None:
    from mesh.libp2p_transport import Libp2pTransport

    async with Libp2pTransport(listen=["/ip4/127.0.0.1/tcp/0"]) as transport:
        transport.set_handler(ECHO, echo_hop)
        print(transport.addrs[0], flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(serve_forever)
