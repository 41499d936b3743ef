"""Households behind NAT (issue 24): routers drawn per host, relay hosts, and the real ReachKeeper.

With `[nat]`, a share of the household hosts (and of the users) sit behind a household router of
a kind drawn from the scenario's mix (`mesh.memory_nat.NatType`), on a home segment of their own:
they dial out to the internet, and nobody outside dials in but as their routers allow
(`mesh.memory_transport`). `relays` public hosts serving no blocks run what `hearth relay` runs: a
`mesh.reachability.ReachKeeper` told to relay. Every serving host runs the real ReachKeeper too,
as `hearth node` does: it asks peers to dial it back, relays for others when public (unless
`public_relay` is false), holds `want_relays` relay slots when not, and takes another when a
relay goes; each change re-announces the host's record (`Node.announce_now`), whose addresses are
the transport's (relayed ones included), so clients reach a host behind NAT through its relays
and punch holes to it where the routers allow (the client's own `Transport.upgrade` calls).

What the DHT's traffic would do is modelled: a host connects to the relays and to `bootstrap`
other hosts from discovery before it serves (those are the peers its keeper asks and reserves
on), waits until it is public or holds its relay slots (at most `REACH_WAIT_S`), and redials the
relays every `REJOIN_S` (a connection reset drops a slot with it). `relay-failure` events kill the
relays holding the most slots. The report's `nat` section counts inference streams by path
(direct, relayed, hole-punched) from the transport, slots, circuits and punches, the keepers'
verdicts, and coverage by hosts a newcomer could reach.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import trio

from mesh.errors import DialError
from mesh.memory_nat import NatType
from mesh.memory_transport import MemoryTransport
from mesh.reachability import Reachability, ReachKeeper, ReachSettings
from mesh.transport import INFERENCE_PROTOCOL, INFO_PROTOCOL, is_relayed_addr
from simulations import churn
from simulations.network import PUBLIC

DIAL_S = 5.0  # one bootstrap dial
REACH_WAIT_S = 30.0  # a host serves once public or holding its slots, or after this long anyway
REJOIN_S = 30.0
PATHS = ("direct", "hole-punched", "relayed")


@dataclass
class RelayHost:
    peer_id: str
    region: str
    addr: str = ""
    state: str = "starting"  # up, down
    life: trio.CancelScope | None = None


class Reach:
    def __init__(self, world):
        self.world, self.spec, self.network = world, world.scenario.nat, world.network
        self.network.punch_on_relay = self.spec.punch == "on-connect"
        self.rng = world.rng("nat")
        self.relays: dict[str, RelayHost] = {}
        self.keepers: dict[str, ReachKeeper] = {}  # serving host -> its keeper (the latest life's)
        self.behind: dict[str, Counter[str]] = {"households": Counter(), "clients": Counter()}
        self.killed: list[str] = []

    def draw(self, peer_id: str, kind: str) -> NatType:
        """The router of a new household host or user ("households" or "clients"): none, or one of the mix."""
        share = self.spec.households if kind == "households" else self.spec.clients
        nat = NatType(churn.weighted_choice(self.rng, self.spec.types)) if self.rng.random() < share \
            else NatType.NONE
        self.behind[kind][nat.value] += 1
        return nat

    async def start(self, nursery: trio.Nursery) -> None:
        """The relay hosts, round robin over the regions (before any household: they bootstrap on them)."""
        regions = sorted(self.world.scenario.regions)
        device = self.world.scenario.device(self.spec.relay_device)
        for index in range(self.spec.relays):
            relay = RelayHost(f"relay{index}", regions[index % len(regions)])
            self.relays[relay.peer_id] = relay
            self.network.place(relay.peer_id, relay.region, device)
            await nursery.start(self._relay_life, relay)

    async def _relay_life(self, relay: RelayHost, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as relay.life:
            async with MemoryTransport.open(self.network, relay.peer_id) as transport:
                relay.addr, relay.state = transport.listen_addrs[0], "up"
                keeper = ReachKeeper(transport, self._settings(relay=True))
                self.keepers[relay.peer_id] = keeper
                self.world.trace.record("relay_up", peer=relay.peer_id, region=relay.region)
                await keeper.run(task_status=task_status)
        relay.state = "down"

    def kill_relays(self, count: int) -> list[str]:
        """The `count` live relays holding the most slots (ties by name) die at once, for good."""
        now = trio.current_time()
        live = sorted((r for r in self.relays.values() if r.state == "up"),
                      key=lambda r: (-self.network.relays.slots_on(r.peer_id, now), r.peer_id))
        for relay in live[:count]:
            self.network.crash(relay.peer_id)
            relay.state = "down"
            relay.life.cancel()
            self.killed.append(relay.peer_id)
        return [r.peer_id for r in live[:count]]

    def _settings(self, *, relay: bool | None) -> ReachSettings:
        return ReachSettings(relay=relay, want_relays=0 if relay else self.spec.want_relays,
                             check_every_s=self.spec.check_every_s, watch_every_s=self.spec.watch_every_s)

    async def serve(self, host, transport: MemoryTransport, node, discovery, *,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Join (relays and bootstrap hosts), keep reachable with a real ReachKeeper re-announcing
        each change, and serve the node once reachable (or after `REACH_WAIT_S`)."""
        settings = self._settings(relay=None if self.spec.public_relay else False)
        async with trio.open_nursery() as nursery:
            def announce() -> None:
                if host.state == "up" and node.discovery is not None:
                    nursery.start_soon(node.announce_now)

            keeper = self.keepers[host.peer_id] = ReachKeeper(transport, settings, on_change=announce)
            await self._join(transport)
            await nursery.start(keeper.run)
            nursery.start_soon(self._stay_joined, transport)
            with trio.move_on_after(REACH_WAIT_S):
                while keeper.reachability is not Reachability.PUBLIC and len(transport.relays()) < settings.want_relays:
                    await trio.sleep(0.5)
            await node.run(transport, discovery, task_status=task_status)
            nursery.cancel_scope.cancel()

    async def _join(self, transport: MemoryTransport) -> None:
        """Connect to the live relays not connected, and to `bootstrap` other hosts if short of them."""
        connected = set(transport.connected_peers())
        for relay in self.relays.values():
            if relay.state == "up" and relay.peer_id not in connected:
                await self._dial(transport, [relay.addr])
        others = [p for p in connected if p not in self.relays and p in self.world.swarm.hosts]
        wanted = self.spec.bootstrap - len(others)
        if wanted <= 0:
            return
        records = await self.world.directory.lookup(self.world.model.digest)
        candidates = sorted((r for r in records if r.peer_id != transport.peer_id and r.peer_id not in connected
                             and r.peer_id in self.world.swarm.hosts), key=lambda r: r.peer_id)
        rng = self.world.rng(f"nat:join:{transport.peer_id}:{trio.current_time():.3f}")
        for record in rng.sample(candidates, min(wanted, len(candidates))):
            await self._dial(transport, record.addrs)

    @staticmethod
    async def _dial(transport: MemoryTransport, addrs) -> bool:
        """The first direct address that answers (relayed ones are for reaching a peer, not for joining)."""
        for addr in addrs:
            if is_relayed_addr(addr):
                continue
            try:
                await transport.dial(addr, timeout=DIAL_S)
                return True
            except DialError:
                continue
        return False

    async def _stay_joined(self, transport: MemoryTransport) -> None:
        while True:
            await trio.sleep(REJOIN_S)
            await self._join(transport)

    def reachable(self, peer_id: str) -> bool:
        """Whether a newcomer on the internet could reach `peer_id` through its addresses now."""
        return self.network.reachable_from(PUBLIC, peer_id)

    def summary(self) -> dict:
        opened = self.network.streams_opened
        households = {p: k for p, k in self.keepers.items() if p not in self.relays}
        return {"behind_nat": {kind: dict(sorted(c.items())) for kind, c in self.behind.items()},
                "relays": len(self.relays), "relays_killed": list(self.killed), "punch": self.spec.punch,
                "public_relay": self.spec.public_relay,
                "hops": {path: opened[(INFERENCE_PROTOCOL, path)] for path in PATHS},
                "probes": {path: opened[(INFO_PROTOCOL, path)] for path in PATHS},
                "verdicts": dict(sorted(Counter(k.reachability.value for k in households.values()).items())),
                "relaying_households": sum(k.relaying for k in households.values()),
                "counts": dict(sorted(self.network.nat_counts.items()))}
