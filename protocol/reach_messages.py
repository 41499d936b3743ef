"""The reach protocol's messages: a peer asked to dial us back says whether we are reachable.

A node behind a household router cannot tell from inside whether others can dial it: its
interfaces show a private address, and a router may or may not forward its port. So it asks peers
it is connected to (`REACH_PROTOCOL`): `DialBackRequest` lists the addresses it announces; the peer
dials each on a new connection (never the one the request came on) and answers `DialBackResult`,
one flag per address, with the address it sees the request come from (the router's, behind NAT).
Defined like `protocol.messages`'s and registered in its `MESSAGE_TYPES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from protocol.errors import InvalidMessage
from protocol.errors import show_value as _show
from protocol.messages import MAX_ADDRESS_CHARS, MESSAGE_TYPES, Message, _str
from protocol.tensors import TensorLimits

MAX_DIAL_BACK_ADDRS = 4  # addresses one request may ask to have dialled: what a requester can make a peer dial


def _addresses(value: object, _limits: TensorLimits) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_DIAL_BACK_ADDRS:
        raise InvalidMessage(f"DialBackRequest.addrs must list 1..{MAX_DIAL_BACK_ADDRS} addresses, got {_show(value)}")
    return tuple(value)


def _flags(value: object, _limits: TensorLimits) -> tuple[bool, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_DIAL_BACK_ADDRS:
        raise InvalidMessage(f"DialBackResult.reached must hold at most {MAX_DIAL_BACK_ADDRS} flags, got {_show(value)}")
    return tuple(value)


@dataclass(frozen=True, kw_only=True)
class DialBackRequest(Message):
    """Asker to peer (reach protocol): dial me at each of these addresses (mine, ending in my peer id)."""

    TYPE: ClassVar[str] = "dial_back_request"
    WIRE_PARSERS: ClassVar[dict[str, Callable[[object, TensorLimits], Any]]] = {"addrs": _addresses}

    addrs: tuple[str, ...]

    def validate(self) -> None:
        if not isinstance(self.addrs, tuple) or not 1 <= len(self.addrs) <= MAX_DIAL_BACK_ADDRS:
            raise InvalidMessage(f"DialBackRequest.addrs must list 1..{MAX_DIAL_BACK_ADDRS} addresses, "
                                 f"got {_show(self.addrs)}")
        for addr in self.addrs:
            _str(self, "addrs", addr, max_chars=MAX_ADDRESS_CHARS, empty=False)


@dataclass(frozen=True, kw_only=True)
class DialBackResult(Message):
    """Peer to asker: for each requested address, whether a new connection to it came up; and the
    address the request arrived from as the peer saw it (empty when its transport cannot tell)."""

    TYPE: ClassVar[str] = "dial_back_result"
    WIRE_PARSERS: ClassVar[dict[str, Callable[[object, TensorLimits], Any]]] = {"reached": _flags}

    reached: tuple[bool, ...]
    observed: str = ""

    def validate(self) -> None:
        if not isinstance(self.reached, tuple) or len(self.reached) > MAX_DIAL_BACK_ADDRS \
                or any(type(flag) is not bool for flag in self.reached):
            raise InvalidMessage(f"DialBackResult.reached must hold at most {MAX_DIAL_BACK_ADDRS} bools, "
                                 f"got {_show(self.reached)}")
        _str(self, "observed", self.observed, max_chars=MAX_ADDRESS_CHARS, empty=True)


MESSAGE_TYPES.update({cls.TYPE: cls for cls in (DialBackRequest, DialBackResult)})
