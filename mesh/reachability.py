"""Whether others can dial us, and staying reachable through relays when they cannot.

A node behind a household router listens on a private address that nobody outside can dial. It
finds out by asking peers it is connected to to dial it back (`REACH_PROTOCOL`, answered by
`DialBack`): each dials the node's announced addresses on a new connection and says which came up,
and with what address the node's connection reached it (its router's, behind NAT). `judge` turns
the answers into a `Reachability`; a lie costs little by construction: PUBLIC needs two peers
that reached us, and anything short of it keeps the node on relays (a peer that says "unreachable"
only makes us use a relay we did not need).

`ReachKeeper` runs that check now and then and acts on it:

- PUBLIC: it offers relaying to others (`Transport.offer_relay`, within `RelayLimits`) unless the
  user said not to, and gives up any relay slots it held.
- otherwise: it holds slots on `want_relays` relays (connected peers that accept a reservation,
  tried in turn; a refusal is not retried for `REFUSED_BACKOFF_S`), whose relayed addresses join
  the transport's `addrs` (and so the node's record), and takes a new one when a relay goes away.

Every answer, reservation and dial is bounded in time; a dial-back server dials only addresses of
the asker itself (its peer id, at the IP address the request came from where the transport can
tell), at most `MAX_DIAL_BACK_ADDRS` of them, `MAX_CONCURRENT_DIAL_BACKS` requests at a time.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from mesh import virtual_time
from mesh.addresses import ip_of
from mesh.errors import DialError, TransportError
from mesh.transport import ByteStream, MessageStream, RelayLimits, Transport, is_relayed_addr
from protocol import (
    REACH_PROTOCOL,
    Codec,
    DialBackRequest,
    DialBackResult,
    Error,
    ErrorCode,
    Hello,
    ProtocolError,
    Role,
)
from protocol.reach_messages import MAX_DIAL_BACK_ADDRS

log = logging.getLogger("hearth.mesh")

SOFTWARE = "hearth-reach/0.1"
DIAL_BACK_TIMEOUT_S = 5.0  # one address dialled back
ASK_TIMEOUT_S = DIAL_BACK_TIMEOUT_S * MAX_DIAL_BACK_ADDRS + 5.0  # a whole request, as the asker waits
MAX_CONCURRENT_DIAL_BACKS = 4
PUBLIC_CONFIRMATIONS = 2  # distinct peers that must have reached us before we call ourselves public
REFUSED_BACKOFF_S = 600.0
RESERVE_TIMEOUT_S = 10.0


class Reachability(enum.Enum):
    UNKNOWN = "unknown"  # no answer yet, or fewer than PUBLIC_CONFIRMATIONS peers, all of which reached us
    PUBLIC = "public"  # at least PUBLIC_CONFIRMATIONS peers dialled us back, and most that answered
    PRIVATE = "private"  # a peer could not reach us, and not enough others could (behind NAT or a firewall)


@dataclass(frozen=True)
class Answer:
    peer_id: str
    reached: bool  # any of our addresses came up from this peer
    observed: str = ""  # our address as the peer saw it


def judge(answers: Sequence[Answer]) -> Reachability:
    """PUBLIC when PUBLIC_CONFIRMATIONS distinct peers reached us and more reached us than not;
    else PRIVATE when a peer could not; else (no answer, or too few that all reached us) UNKNOWN."""
    reached = {a.peer_id for a in answers if a.reached}
    missed = {a.peer_id for a in answers if not a.reached} - reached
    if len(reached) >= PUBLIC_CONFIRMATIONS and len(reached) > len(missed):
        return Reachability.PUBLIC
    return Reachability.PRIVATE if missed else Reachability.UNKNOWN


def _hello() -> Hello:
    return Hello(software=SOFTWARE, codecs=(Codec.FP32,))


class DialBack:
    """The reach protocol's server: dials an asker back at its own addresses on new connections."""

    def __init__(self, transport: Transport, *, timeout_s: float = DIAL_BACK_TIMEOUT_S,
                 max_concurrent: int = MAX_CONCURRENT_DIAL_BACKS):
        self.transport, self.timeout_s = transport, timeout_s
        self._slots = trio.Semaphore(max_concurrent)

    def install(self) -> None:
        self.transport.set_handler(REACH_PROTOCOL, self.handle)

    async def handle(self, raw: ByteStream) -> None:
        stream = MessageStream(raw, Role.HOP, io_timeout=10.0, max_frame_bytes=1 << 16)
        try:
            if not isinstance(await stream.receive(), Hello):
                return  # the session machine rejects anything else first; nothing to answer
            await stream.send(_hello())
            request = await stream.receive()
            if not isinstance(request, DialBackRequest):
                return
            refused = self._refusal(raw, request)
            if refused is None and self._slots.value == 0:
                refused = "busy: too many dial-back requests at once"
            if refused is not None:
                await stream.send(Error(code=ErrorCode.DIAL_BACK_REFUSED, reason=refused))
                return
            async with self._slots:
                reached = [await self._dial(raw, addr) for addr in request.addrs]
            await stream.send(DialBackResult(reached=tuple(reached), observed=_observed(raw)))
        except (TransportError, ProtocolError) as err:
            log.debug("dial-back for %s ended: %s", raw.peer_id, err)
        finally:
            await stream.aclose()

    @staticmethod
    def _refusal(raw: ByteStream, request: DialBackRequest) -> str | None:
        """Why the asker may not have these addresses dialled (None: it may)."""
        for addr in request.addrs:
            if not addr.endswith(f"/p2p/{raw.peer_id}") or is_relayed_addr(addr):
                return f"{addr} is not a direct address of the asking peer {raw.peer_id}"
        return None

    async def _dial(self, raw: ByteStream, addr: str) -> bool:
        """Dial `addr` back, if it is where the request came from: any other address (a private one
        behind the asker's router, say) is answered "not reached" undialled, so that no peer can
        aim our dials at a third party or probe our own LAN through us."""
        ip = _ip(addr)
        if raw.remote_host is not None and (ip is None or str(ip) != raw.remote_host):
            return False
        return await self.transport.dial_back(addr, timeout=self.timeout_s)


def _ip(addr: str):
    import multiaddr

    try:
        return ip_of(multiaddr.Multiaddr(addr.split("/p2p/", 1)[0]))
    except Exception:  # multiaddr's several parse errors: not an IP address at all
        return None


def _observed(raw: ByteStream) -> str:
    host = raw.remote_host
    if host is None:
        return ""
    return f"/ip6/{host}" if ":" in host else f"/ip4/{host}"


async def ask_dial_back(transport: Transport, peer_id: str, addrs: Sequence[str], *,
                        timeout: float = ASK_TIMEOUT_S) -> Answer:
    """Ask `peer_id` to dial us back at `addrs` (at most MAX_DIAL_BACK_ADDRS of them). Raises
    TransportError or ProtocolError when it does not answer, or refuses."""
    with trio.fail_after(timeout):
        raw = await transport.open_stream(peer_id, REACH_PROTOCOL, timeout=timeout)
        stream = MessageStream(raw, Role.CLIENT, io_timeout=timeout, max_frame_bytes=1 << 16)
        try:
            await stream.send(_hello())
            await stream.receive()  # its Hello (the session machine checks it is one)
            result = await stream.request(DialBackRequest(addrs=tuple(addrs[:MAX_DIAL_BACK_ADDRS])))
        finally:
            await stream.aclose()
    if isinstance(result, Error):
        raise DialError(peer_id, f"dial-back refused: {result.reason}")
    return Answer(peer_id, any(result.reached), result.observed)


@dataclass(frozen=True)
class ReachSettings:
    relay: bool | None = None  # offer relaying: True, False, or None = only when public
    want_relays: int = 2  # relay slots a node that is not public holds
    check_every_s: float = 300.0  # how often to ask peers whether we are reachable
    unknown_every_s: float = 30.0  # as long as too few peers answered (and whenever we gain peers)
    watch_every_s: float = 5.0  # how often to check that our relays are still there
    ask_peers: int = 3  # peers asked in one check
    relay_limits: RelayLimits = field(default_factory=RelayLimits)


class ReachKeeper:
    """Keeps a transport reachable: checks, offers relaying when public, holds relay slots when not.

    `on_change()` is called (synchronously) after the announced addresses or the reachability
    changed, so that the owner re-announces and says so; `reachability` and `observed` tell the
    latest verdict and our address as peers see it.
    """

    def __init__(self, transport: Transport, settings: ReachSettings = ReachSettings(), *,
                 on_change: Callable[[], None] = lambda: None):
        self.transport, self.settings, self.on_change = transport, settings, on_change
        self.reachability = Reachability.UNKNOWN
        self.observed = ""
        self.relaying = False
        self._refused: dict[str, float] = {}  # relay candidate -> when it may be asked again
        self._held: list[str] = []  # the relays we held a slot on at the last look
        self._checked = trio.Event()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        DialBack(self.transport).install()
        if self.settings.relay:
            self._offer_relay()
        task_status.started()
        next_check, peers_then = -math.inf, 0
        while True:
            peers = len(self._peers())
            gained = self.reachability is Reachability.UNKNOWN and peers > peers_then
            if peers and (trio.current_time() >= next_check or gained):
                await self.check()
                peers_then = peers
                next_check = trio.current_time() + (self.settings.unknown_every_s if self.reachability
                                                    is Reachability.UNKNOWN else self.settings.check_every_s)
            if self.reachability is not Reachability.PUBLIC and not self.settings.relay:
                await self.keep_relays()  # (a node told to relay is meant to be reachable: it holds no slots)
            await virtual_time.sleep(self.settings.watch_every_s)

    async def wait_checked(self) -> None:
        """Until the first check has an answer (a test's or a command's readiness)."""
        await self._checked.wait()

    async def check(self) -> Reachability:
        """Ask up to `ask_peers` connected peers to dial us back; act on the verdict."""
        addrs = [a for a in self.transport.addrs if not is_relayed_addr(a)][:MAX_DIAL_BACK_ADDRS]
        answers: list[Answer] = []

        async def ask(peer_id: str) -> None:
            try:
                answers.append(await ask_dial_back(self.transport, peer_id, addrs))
            except (TransportError, ProtocolError, trio.TooSlowError) as err:
                log.debug("peer %s did not dial us back: %s", peer_id, err)

        if addrs:
            async with trio.open_nursery() as nursery:
                for peer_id in self._peers()[:self.settings.ask_peers]:
                    nursery.start_soon(ask, peer_id)
        verdict = judge(answers)
        observed = next((a.observed for a in answers if a.observed), self.observed)
        changed = verdict is not self.reachability and verdict is not Reachability.UNKNOWN
        if changed:
            log.info("reachability: %s (%d of %d peers reached us)", verdict.value,
                     sum(a.reached for a in answers), len(answers))
            self.reachability = verdict
        self.observed = observed
        if self.reachability is Reachability.PUBLIC:
            for relay in self.transport.relays():
                self.transport.release(relay)
            if self.settings.relay is not False and not self.relaying:
                self._offer_relay()
        if answers:
            self._checked.set()
        if changed:
            self.on_change()
        return self.reachability

    async def keep_relays(self) -> None:
        """Hold `want_relays` relay slots: try connected peers that have not refused lately (a slot
        lost with its relay, or due for renewal, is taken again here); `on_change` when the set of
        relays we hold a slot on changed."""
        before, held = self._held, self.transport.relays()
        now = trio.current_time()
        for peer_id in self._peers():
            if len(held) >= self.settings.want_relays:
                break
            if peer_id in held or self._refused.get(peer_id, -math.inf) > now:
                continue
            try:
                relayed = await self.transport.reserve(peer_id, timeout=RESERVE_TIMEOUT_S)
            except (TransportError, trio.TooSlowError) as err:
                self._refused[peer_id] = now + REFUSED_BACKOFF_S
                log.debug("no relay slot on %s: %s", peer_id, err)
                continue
            held = self.transport.relays()
            if peer_id not in before:
                log.info("relay slot on %s: reachable at %s", peer_id, " ".join(relayed))
        self._held = held
        if set(held) != set(before):
            self.on_change()

    def _offer_relay(self) -> None:
        try:
            self.transport.offer_relay(self.settings.relay_limits)
        except NotImplementedError as err:
            log.info("not relaying for others: %s", err)
            return
        self.relaying = True
        log.info("relaying for peers behind NAT (up to %d slots)", self.settings.relay_limits.max_reservations)
        self.on_change()

    def _peers(self) -> list[str]:
        return [p for p in self.transport.connected_peers() if p != self.transport.peer_id]
