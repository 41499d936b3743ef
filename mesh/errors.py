"""Errors of the network layer: each names the peer and what failed."""

from __future__ import annotations


class TransportError(Exception):
    """Base: a dial, stream, read or write failed."""


class DialError(TransportError):
    def __init__(self, target: str, reason: str):
        self.target, self.reason = target, reason
        super().__init__(f"cannot reach {target}: {reason}")


class StreamClosed(TransportError):
    """The peer closed or reset the stream (or vanished)."""

    def __init__(self, peer_id: str, reason: str = "stream closed"):
        self.peer_id, self.reason = peer_id, reason
        super().__init__(f"{reason} by peer {peer_id}")


class TransportTimeout(TransportError):
    def __init__(self, peer_id: str, what: str, seconds: float):
        self.peer_id, self.what, self.seconds = peer_id, what, seconds
        super().__init__(f"{what} with peer {peer_id} timed out after {seconds:g} s")
