"""The virtual network: regions, access links, jitter, loss, region partitions and clogged hosts.

`VirtualNetwork` is the in-memory transport's `MemoryNetwork` with a link model: one-way latency
is half the round trip between the two hosts' regions plus each host's last-mile latency, plus an
exponential jitter per message; a lost message waits for a retransmission (TCP's timeout: at least
200 ms, or two round trips). Bandwidth is asymmetric: the sender's uplink or the receiver's
downlink, whichever is slower, scaled by `bandwidth_scale` so that the simulator's narrow stand-in
activations take as long as the real ones would. Partitions cut every pair of hosts between two
regions; a clogged host's links all stop (both as `MemoryNetwork.cut` does: streams stall and
only timeouts notice). Randomness comes from the `random.Random` passed in.

Every host and user is on one segment, `PUBLIC` (the internet: regions set latency, not
reachability), and listens on it by wildcard, so a record carries the host's public and loopback
addresses and a client reaches a host only through the public one, as `MemoryNetwork` enforces;
except those placed behind a router (`[nat]`, `simulations.nat`): they are on a home segment of
their own and reach `PUBLIC` through it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from mesh.memory_nat import NatType
from mesh.memory_transport import Link, MemoryNetwork
from simulations.scenario import DeviceProfile, NetworkSpec

MIN_RETRANSMIT_S = 0.2
PUBLIC = "internet"  # the segment every host and user is on


class VirtualNetwork(MemoryNetwork):
    def __init__(self, spec: NetworkSpec, rng: random.Random, *, bandwidth_scale: float = 1.0):
        super().__init__()
        self.spec, self.rng, self.bandwidth_scale = spec, rng, bandwidth_scale
        self.hosts: dict[str, tuple[str, DeviceProfile]] = {}
        self.partitioned: set[frozenset[str]] = set()  # region pairs that cannot reach each other
        self.clogged: set[str] = set()
        self.link_model = self.model_link
        self._base: dict[tuple[str, str], Link] = {}
        self.messages = 0
        self.losses = 0

    def place(self, peer_id: str, region: str, device: DeviceProfile, nat: NatType = NatType.NONE) -> None:
        """Say where `peer_id` lives, what its access link is and what router it is behind (before it
        opens its transport)."""
        self.hosts[peer_id] = (region, device)
        if nat is NatType.NONE:
            self.attach(peer_id, (PUBLIC,))
        else:
            self.attach(peer_id, (f"home-{peer_id}",), nat=nat, outside=PUBLIC)

    def region(self, peer_id: str) -> str:
        return self.hosts[peer_id][0]

    def base_link(self, src: str, dst: str) -> Link:
        """Latency and bandwidth from `src` to `dst` without jitter or loss."""
        key = (src, dst)
        if key not in self._base:
            (src_region, src_device), (dst_region, dst_device) = self.hosts[src], self.hosts[dst]
            latency = self.spec.pair_rtt(src_region, dst_region) / 2
            latency += (src_device.access_ms + dst_device.access_ms) / 1000
            bandwidth = min(src_device.uplink_mbps, dst_device.downlink_mbps) * 1e6 * self.bandwidth_scale
            self._base[key] = Link(latency, bandwidth)
        return self._base[key]

    def model_link(self, src: str, dst: str) -> Link:
        if src not in self.hosts or dst not in self.hosts:
            return self.default_link
        base = self.base_link(src, dst)
        self.messages += 1
        extra = self.rng.expovariate(1.0 / self.spec.jitter_s) if self.spec.jitter_s > 0 else 0.0
        if self.spec.loss > 0 and self.rng.random() < self.spec.loss:
            self.losses += 1
            extra += max(MIN_RETRANSMIT_S, 4 * base.latency_s)
        return Link(base.latency_s + extra, base.bandwidth_bps)

    def is_cut(self, a: str, b: str) -> bool:
        if a in self.clogged or b in self.clogged:
            return True
        if self.partitioned and a in self.hosts and b in self.hosts \
                and frozenset((self.hosts[a][0], self.hosts[b][0])) in self.partitioned:
            return True
        return super().is_cut(a, b)

    def partition(self, regions: Iterable[str], all_regions: Iterable[str]) -> list[frozenset[str]]:
        """Cut `regions` off from every other region; returns the region pairs cut (for `heal`)."""
        inside, everyone = sorted(set(regions)), sorted(set(all_regions))
        pairs = [frozenset((a, b)) for a in inside for b in everyone if b not in inside]
        self.partitioned.update(pairs)
        return pairs

    def heal(self, pairs: Iterable[frozenset[str]]) -> None:
        for pair in pairs:
            self.partitioned.discard(pair)

    def clog(self, peer_id: str) -> None:
        self.clogged.add(peer_id)

    def unclog(self, peer_id: str) -> None:
        self.clogged.discard(peer_id)

    def reachable(self, peer_id: str) -> bool:
        """Up, not frozen and not clogged (partitions aside: those depend on who is asking)."""
        return peer_id in self.peers and not self.is_down(peer_id) and not self.is_frozen(peer_id) \
            and peer_id not in self.clogged
