"""Who stays in a full provider index: newcomers are never crowded out by one origin's identities.

py-libp2p 0.8.1 keeps at most 20 providers per key and ignores newcomers once a key is full,
for 48 hours: twenty throwaway identities registered as providers of a model were enough to
keep every node announced after them out of the index that lookups depend on (issue 18, item 2).
Identities cost nothing; addresses do. `install` replaces the provider store's `add_provider`
on our DHT with a fairer rule:

- up to `MAX_PROVIDERS_PER_KEY` providers per key (a household swarm has a few dozen nodes);
- when a key is full, a newcomer takes the place of the least recently refreshed provider of
  the most represented *origin*: the IP address (an IPv6 /64) of the connection the provider
  came through (a provider registers only itself, so that is its own connection). Every
  identity an attacker runs from one machine shares one origin: they only ever displace each
  other, and an honest node from any other address always gets in.

Honest nodes re-provide with every refresh (every 10 s), so the staleness order keeps them.
Peers on the same address as the attacker (processes on one host) share its fate: that is the
limit of what an address can tell apart.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import Counter

from libp2p.abc import IHost
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.kad_dht.provider_store import ProviderRecord
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from mesh import libp2p_addressing

log = logging.getLogger(__name__)

MAX_PROVIDERS_PER_KEY = 64
IPV6_ORIGIN_PREFIX = 64  # one household (or one attacker) holds a whole /64


def origin_of(host: IHost, peer: ID) -> str:
    """Where `peer` connects to us from: its IPv4 address, its IPv6 /64, or its own id when it
    has no connection (our own provider records)."""
    for conn in host.get_network().get_connections(peer):
        ip = libp2p_addressing.local_ip(getattr(conn, "muxed_conn", conn), remote=True)  # SwarmConn -> yamux
        if ip is None:
            continue
        if ip.version == 6:
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.ip_network(f"{ip}/{IPV6_ORIGIN_PREFIX}", strict=False))
        return str(ip)
    return f"peer:{peer}"


class FairProviders:
    """The rule above, for one DHT's provider store; `origins` says where each provider came from."""

    def __init__(self, dht: KadDHT, host: IHost, *, max_per_key: int | None = None):
        self.store, self.host = dht.provider_store, host
        self.max_per_key = max_per_key or MAX_PROVIDERS_PER_KEY
        self.origins: dict[bytes, dict[str, str]] = {}  # key -> provider peer id -> origin when it registered

    def add_provider(self, key: bytes, provider: PeerInfo) -> None:
        if not provider or not provider.peer_id:
            return
        providers = self.store.providers.setdefault(key, {})
        peer, origin = str(provider.peer_id), origin_of(self.host, provider.peer_id)
        seen = self.origins.setdefault(key, {})
        for gone in seen.keys() - providers.keys():  # expired in the store since
            del seen[gone]
        if peer not in providers and len(providers) >= self.max_per_key:
            self._evict_for(providers, seen, origin)
        providers[peer] = ProviderRecord(provider_info=provider, timestamp=time.time())
        seen[peer] = origin

    @staticmethod
    def _evict_for(providers: dict[str, ProviderRecord], seen: dict[str, str], newcomer: str) -> None:
        def origin(peer: str) -> str:
            return seen.get(peer, f"peer:{peer}")

        counts = Counter(origin(p) for p in providers)
        counts[newcomer] += 1  # a newcomer from the largest origin displaces its own kind
        crowded = max(counts, key=lambda o: counts[o])
        stalest = min((p for p in providers if origin(p) == crowded), key=lambda p: providers[p].timestamp,
                      default=None)
        if stalest is None:  # the largest origin is the newcomer's, and it holds nothing yet
            stalest = min(providers, key=lambda p: providers[p].timestamp)
        log.debug("provider index full: a newcomer from %s replaces %s from %s", newcomer, stalest, crowded)
        del providers[stalest]
        seen.pop(stalest, None)


def install(dht: KadDHT, host: IHost, *, max_per_key: int | None = None) -> FairProviders:
    """Give `dht`'s provider store the rule above (on this instance only)."""
    fair = FairProviders(dht, host, max_per_key=max_per_key)
    dht.provider_store.add_provider = fair.add_provider
    return fair
