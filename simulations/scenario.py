"""Scenarios: a TOML file read into typed, validated dataclasses, once, before a run starts.

A scenario names the model (its real shape: blocks, widths, bytes), the regions and their round
trips, device profiles (compute per block per token, memory, links), household churn (Weibull
session lengths, how sessions end), the day/night pattern, data-center nodes, the users,
scheduled fault events, hostile hosts (`[hostile]`, `simulations.hostile`) and households behind
NAT with the relays they use (`[nat]`, `simulations.nat`). Durations are
written "250ms", "30s", "20m", "2h"; the times of events may also be a share of the run ("25%"),
so a scenario keeps its shape at any `--duration`.
Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SCENARIO_DIR = Path(__file__).parent / "scenarios"
EVENT_KINDS = ("datacenter-outage", "partition", "flash-crowd", "swizzle-clog", "mass-departure", "relay-failure")
SPAN_POLICIES = ("weakest", "balanced", "random")
HOSTILE_BEHAVIOURS = ("forge", "hoard", "stall", "corrupt")
NAT_TYPES = ("full-cone", "restricted", "port-restricted", "symmetric")  # mesh.memory_nat.NatType's values
PUNCH_MODES = ("client", "on-connect")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)\s*$")
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmg]i?b|b)\s*$", re.IGNORECASE)


class ScenarioError(ValueError):
    """A scenario file that cannot be used; says where and what."""

    def __init__(self, where: str, reason: str):
        self.where, self.reason = where, reason
        super().__init__(f"{where}: {reason}")


def parse_duration(text: str | int | float, where: str = "duration") -> float:
    """Seconds in "250ms", "30s", "20m", "2h", "1d" (a bare number is seconds)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = _DURATION.match(str(text))
        if match is None:
            raise ScenarioError(where, f"{text!r} is not a duration like 250ms, 30s, 20m or 2h")
        value = float(match.group(1)) * _UNITS[match.group(2)]
    if value < 0:
        raise ScenarioError(where, f"{text!r} is negative")
    return value


def parse_size(text: str | int | float, where: str = "size") -> int:
    """Bytes in "4MiB", "32MB", "512KiB", "1GiB" (a bare number is bytes)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = _SIZE.match(str(text))
        if match is None:
            raise ScenarioError(where, f"{text!r} is not a size like 4MiB, 512KiB or 32MB")
        value = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if value <= 0:
        raise ScenarioError(where, f"{text!r} is not positive")
    return int(value)


@dataclass(frozen=True)
class Moment:
    """A point or length of time: absolute seconds, or a share of the run's duration."""

    seconds: float = 0.0
    share: float | None = None

    @classmethod
    def parse(cls, text: str | int | float, where: str) -> Moment:
        if isinstance(text, str) and text.strip().endswith("%"):
            try:
                share = float(text.strip()[:-1]) / 100
            except ValueError:
                raise ScenarioError(where, f"{text!r} is not a percentage") from None
            if not 0 <= share <= 10:
                raise ScenarioError(where, f"{text!r} is out of range")
            return cls(share=share)
        return cls(seconds=parse_duration(text, where))

    def resolve(self, run_seconds: float) -> float:
        return self.seconds if self.share is None else self.share * run_seconds


def _duration(default: float) -> Any:
    return field(default=default, metadata={"duration": True})


@dataclass(frozen=True)
class ModelShape:
    """The model being served, as the cost model sees it (the real model's sizes)."""

    name: str = "llama-13b-like"
    blocks: int = 40
    hidden_size: int = 5120
    kv_heads: int = 40
    head_dim: int = 128
    block_params: float = 325e6
    max_length: int = 1024  # positions a session may use
    wire_bytes_per_value: float = 2.0  # fp16 activations on the real wire
    kv_bytes_per_value: float = 2.0
    stand_in_hidden: int = 128  # width of the stand-in activations the simulator actually sends
    vocab: int = 256


@dataclass(frozen=True)
class DeviceProfile:
    """A kind of machine: its compute, its memory and its access link."""

    name: str = "laptop"
    weight: float = 1.0  # share among household nodes
    block_ms: float = 10.0  # milliseconds per block per decoded token
    prefill_factor: float = 0.2  # each further prompt token costs this share of a decoded one
    weights_gb: float = 4.0  # memory for the span's weights
    kv_gb: float = 1.0  # KV-cache budget
    max_sessions: int = 16
    bytes_per_param: float = 1.0  # int8
    uplink_mbps: float = 10.0
    downlink_mbps: float = 100.0
    access_ms: float = 5.0  # one-way last-mile latency


@dataclass(frozen=True)
class NetworkSpec:
    intra_rtt_s: float = _duration(0.02)
    inter_rtt_s: float = _duration(0.15)  # between regions not listed in `rtt`
    rtt: dict[str, Any] = field(default_factory=dict)  # "na-eu" = "90ms"
    jitter_s: float = _duration(0.002)  # mean of an exponential extra delay per message
    loss: float = 0.0  # probability that a message waits for a retransmission
    resets_per_hour: float = 0.0  # connections dropped (streams reset) per hour, network-wide

    def pair_rtt(self, a: str, b: str) -> float:
        if a == b:
            return self.intra_rtt_s
        for key in (f"{a}-{b}", f"{b}-{a}"):
            if key in self.rtt:
                return parse_duration(self.rtt[key], f"network.rtt.{key}")
        return self.inter_rtt_s


@dataclass(frozen=True)
class ChurnSpec:
    """Household nodes: how many, how long they stay, how they leave and come back."""

    nodes: int = 40
    shape: float = 0.5  # Weibull shape of session lengths
    median_s: float = _duration(3600.0)  # Weibull median of session lengths
    leave: float = 0.5  # weights of the ways a session ends: drained on shutdown,
    crash: float = 0.3  # gone at once (streams reset),
    freeze: float = 0.2  # silent (suspended laptop, power cut)
    freeze_for_s: float = _duration(120.0)  # a frozen host thaws or dies after this long
    freeze_then_crash: float = 0.5
    restart: float = 0.2  # a crashed host comes back with its identity and span
    restart_after_s: float = _duration(60.0)


@dataclass(frozen=True)
class DayNight:
    start_hour: float = 12.0  # local time when the run starts
    peak_hour: float = 21.0
    amplitude: float = 0.0  # 0: flat; 0.5: rates swing between 0.5x and 1.5x


@dataclass(frozen=True)
class CloudSpec:
    """Data-center nodes (the bootstrap hosts): serve the whole model from a fast device."""

    nodes: int = 0
    device: str = "datacenter"
    regions: list[str] = field(default_factory=list)  # round robin; all regions if empty


@dataclass(frozen=True)
class ClientSpec:
    count: int = 10
    device: str = "client"
    think_s: float = _duration(60.0)  # mean pause between a user's requests (Poisson arrivals)
    prompt_tokens: list[int] = field(default_factory=lambda: [16, 96])
    new_tokens: list[int] = field(default_factory=lambda: [32, 64])
    request_timeout_s: float = _duration(300.0)
    step_timeout_s: float = _duration(10.0)
    open_timeout_s: float = _duration(10.0)
    probe_timeout_s: float = _duration(3.0)
    ban_s: float = _duration(15.0)
    verify_rate: float = 0.0  # spot checks (`mesh.client.ClientOptions.verify_rate`); 0: off
    # speculative decoding (`mesh.speculative`): up to `max_drafts` drafts a pass, from
    # `simulations.drafts.ReferenceDrafter`, each right with probability `draft_acceptance`
    speculative: bool = False
    max_drafts: int = 8
    draft_acceptance: float = 0.8


@dataclass(frozen=True)
class BalanceSpec:
    """How household hosts choose spans: "weakest" where the swarm is weakest when they join
    (mesh.balance.choose_span, as `hearth node` without --blocks); "balanced" that and rebalancing
    afterwards (node.rebalance); "random" a random window of what fits, for comparison."""

    spans: str = "weakest"
    every_s: float = _duration(120.0)  # node.rebalance.BalanceSettings
    threshold: float = 0.2
    settle_s: float = _duration(300.0)
    grace_s: float = _duration(60.0)


@dataclass(frozen=True)
class FetchSpec:
    """Weights from peers (issue 21; `simulations.fetch`): `seeds` household hosts start with the
    whole model; every other household host joins with no files, as `hearth node --model-digest`
    does: it asks the hosts that serve the model for the manifest, chooses its span, downloads that
    span's pieces from the hosts holding them, and only then serves. 0 seeds: every host has the
    files and nothing is downloaded (the plain run)."""

    seeds: int = 0
    seed_device: str = ""  # the seeds' device profile; empty: drawn like every household's
    piece: str = "4MiB"  # the manifest's piece size (shard.manifest.PIECE_BYTES)
    upload: str = "32MiB"  # per second: a node's uploads in all (node.piece_server.UploadLimits.bytes_per_second)
    upload_streams: int = 8  # node.piece_server.UploadLimits: streams uploading pieces at once,
    upload_streams_per_peer: int = 2  # and per fetching peer
    streams: int = 8  # mesh.fetch.FetchLimits: a fetcher's streams open at once,
    streams_per_peer: int = 2  # and per holder
    bytes_per_param: float = 1.0  # the model files (1: int8, 2: fp16), which set a block's bytes
    join_over_s: float = _duration(0.0)  # the initial households (not the seeds) arrive at random times in this window
    retry_after_s: float = _duration(60.0)  # a node whose fetch failed (no manifest in 60 s) is restarted after this

    @property
    def piece_bytes(self) -> int:
        return parse_size(self.piece, "fetch.piece")

    @property
    def upload_bytes_per_s(self) -> float:
        return float(parse_size(self.upload, "fetch.upload"))


@dataclass(frozen=True)
class ChecksSpec:
    hang_grace_s: float = _duration(30.0)  # past a request's deadline, a session still running has hung
    sample_every_s: float = _duration(60.0)


@dataclass(frozen=True)
class HostileSpec:
    """Hostile hosts (`simulations.hostile`): `fraction` of the swarm at the start, each doing every
    behaviour listed. "forge": records under honest peers' ids and its own pinned for an hour (the
    sealed directory refuses them); "hoard": many tiny sessions on honest nodes kept alive by rare
    steps, and a prefill rewound in a loop; "stall": a real node announcing `lie` x its throughput
    that stalls every session after a few frames (silent, or half a frame, then silent); "corrupt": a
    real node whose outputs carry noise of relative size `corrupt` (`node.chaos.Chaos`) on each step
    with probability `corrupt_probability`, serving an honest host's span unless it also stalls."""

    fraction: float = 0.0  # share of the swarm at the start: round(nodes * f / (1 - f)) join the honest ones
    behaviours: list[str] = field(default_factory=lambda: ["forge", "hoard", "stall"])  # "corrupt" only if named
    device: str = "desktop-gpu"  # what a stalling node runs (how many blocks it serves)
    lie: float = 100.0  # a stalling node announces this many times its real throughput
    stall_frames: list[int] = field(default_factory=lambda: [0, 4])  # answered after its Hello, then it stalls
    half_frame: float = 0.5  # share of stalls that send half of the next frame first
    forge_every_s: float = _duration(10.0)
    hoard_targets: int = 3  # honest nodes each hoarder works on at once
    hoard_sessions: int = 12  # sessions it tries to hold on each (a node allows 8 per peer)
    keepalive_s: float = _duration(250.0)  # a 1-token step on each hoarded session this often
    rewind_tokens: int = 256  # the prefill rewound to position 0 in a loop on each target; 0: none
    retarget_s: float = _duration(60.0)  # how often a hoarder looks for targets to replace lost ones
    corrupt: float = 0.01  # a lying node's noise, relative to each output row's RMS (`node.chaos.ChaosSpec`)
    corrupt_probability: float = 1.0  # share of its steps it corrupts


@dataclass(frozen=True)
class NatSpec:
    """Households behind routers (issue 24; `simulations.nat`): `households` of the household hosts
    (and `clients` of the users) sit behind a router of a kind drawn from `types` (weights; see
    `mesh.memory_nat.NatType`), on a home segment of their own. `relays` public hosts serving no
    blocks relay for them (`hearth relay`); public households relay too unless `public_relay` is
    false (a ReachKeeper's default: only when peers can dial it). Every host runs the real
    `mesh.reachability.ReachKeeper` (dial-back checks every `check_every`, `want_relays` relay slots
    watched every `watch_every`) after connecting to the relays and `bootstrap` other hosts, as the
    DHT would. Hole punching: "client" when the client asks for it (`Transport.upgrade`),
    "on-connect" also when a relayed connection comes in (libp2p's DCUtR). All zero: no NAT, and
    no draw taken (the plain run, hash for hash)."""

    households: float = 0.0
    clients: float = 0.0
    types: dict[str, float] = field(default_factory=lambda: {"full-cone": 0.2, "restricted": 0.2,
                                                            "port-restricted": 0.35, "symmetric": 0.25})
    relays: int = 0
    relay_device: str = "datacenter"
    public_relay: bool = True
    want_relays: int = 2
    check_every_s: float = _duration(300.0)
    watch_every_s: float = _duration(5.0)
    bootstrap: int = 3
    punch: str = "client"

    @property
    def enabled(self) -> bool:
        return self.households > 0 or self.clients > 0 or self.relays > 0


@dataclass(frozen=True)
class Event:
    kind: str
    at: Moment
    duration: Moment = Moment(0.0)
    regions: tuple[str, ...] = ()  # partition: these regions are cut off from the others
    clients: int = 0  # flash-crowd: this many extra users,
    crowd: float = 0.0  # or this many times clients.count
    think: Moment = Moment(5.0)  # flash-crowd: their mean pause between requests
    hosts: int = 0  # swizzle-clog: this many hosts clogged one by one; relay-failure: this many relays killed (1)
    share: float = 0.0  # mass-departure: this share of the household hosts leave at once
    interval: Moment = Moment(10.0)  # swizzle-clog: between one clog (or unclog) and the next


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str = ""
    duration_s: float = _duration(3600.0)
    seed: int = 0
    compute: str = "cost"  # "cost": cost model with stand-in activations; "torch": a real checkpoint
    model: ModelShape = ModelShape()
    network: NetworkSpec = NetworkSpec()
    regions: dict[str, float] = field(default_factory=lambda: {"home": 1.0})
    devices: dict[str, DeviceProfile] = field(default_factory=dict)
    churn: ChurnSpec = ChurnSpec()
    day_night: DayNight = DayNight()
    cloud: CloudSpec = CloudSpec()
    clients: ClientSpec = ClientSpec()
    balance: BalanceSpec = BalanceSpec()
    checks: ChecksSpec = ChecksSpec()
    hostile: HostileSpec = HostileSpec()
    fetch: FetchSpec = FetchSpec()
    nat: NatSpec = NatSpec()
    events: tuple[Event, ...] = ()

    def scaled(self, *, nodes: int | None = None, clients: int | None = None,
               duration_s: float | None = None, seed: int | None = None, spans: str | None = None,
               hostile: float | None = None, verify_rate: float | None = None,
               speculative: bool | None = None) -> Scenario:
        """This scenario with the command line's overrides applied (`hostile`: its fraction)."""
        changed = self
        if speculative is not None:
            changed = dataclasses.replace(changed, clients=dataclasses.replace(changed.clients, speculative=speculative))
        if verify_rate is not None:
            changed = dataclasses.replace(changed, clients=dataclasses.replace(changed.clients, verify_rate=verify_rate))
        if hostile is not None:
            changed = dataclasses.replace(changed, hostile=dataclasses.replace(changed.hostile, fraction=hostile))
        if spans is not None:
            changed = dataclasses.replace(changed, balance=dataclasses.replace(changed.balance, spans=spans))
        if nodes is not None:
            changed = dataclasses.replace(changed, churn=dataclasses.replace(changed.churn, nodes=nodes))
        if clients is not None:
            changed = dataclasses.replace(changed, clients=dataclasses.replace(changed.clients, count=clients))
        if duration_s is not None:
            changed = dataclasses.replace(changed, duration_s=duration_s)
        if seed is not None:
            changed = dataclasses.replace(changed, seed=seed)
        return changed

    def device(self, name: str) -> DeviceProfile:
        if name not in self.devices:
            raise ScenarioError("devices", f"no device profile named {name!r} (have {', '.join(sorted(self.devices))})")
        return self.devices[name]


# Household devices for a 13B model in int8 (0.33 GB a block): decode is memory-bound, so a block
# takes about its bytes over the device's memory bandwidth.
DEFAULT_DEVICES = {
    "laptop": DeviceProfile("laptop", 0.5, block_ms=8.0, weights_gb=3.0, kv_gb=1.0),  # ~40 GB/s, 9 blocks
    "desktop-gpu": DeviceProfile("desktop-gpu", 0.3, block_ms=1.0, prefill_factor=0.05, weights_gb=8.0,
                                 kv_gb=2.0, uplink_mbps=20.0, downlink_mbps=200.0),  # 12 GB card, 24 blocks
    "mini-pc": DeviceProfile("mini-pc", 0.2, block_ms=32.0, weights_gb=1.5, kv_gb=0.5, max_sessions=8,
                             uplink_mbps=5.0, downlink_mbps=50.0, access_ms=8.0),  # ~10 GB/s, 4 blocks
    "datacenter": DeviceProfile("datacenter", 0.0, block_ms=0.3, prefill_factor=0.02, weights_gb=80.0,
                                kv_gb=20.0, max_sessions=64, bytes_per_param=2.0, uplink_mbps=1000.0,
                                downlink_mbps=1000.0, access_ms=0.5),  # fp16, the whole model
    "client": DeviceProfile("client", 0.0, uplink_mbps=20.0, downlink_mbps=100.0),
}


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario; `path` may also name a built-in one ("steady")."""
    path = Path(path)
    if not path.exists() and (SCENARIO_DIR / f"{path.name}.toml").exists():
        path = SCENARIO_DIR / f"{path.name}.toml"
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScenarioError(str(path), "no such scenario file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ScenarioError(str(path), f"cannot read: {err}") from err
    return scenario_from_dict(raw, str(path), default_name=path.stem)


def scenario_from_dict(raw: dict[str, Any], where: str = "scenario", *, default_name: str = "scenario") -> Scenario:
    raw = dict(raw)
    devices = dict(DEFAULT_DEVICES)
    for name, table in (raw.pop("devices", None) or {}).items():
        base = dataclasses.asdict(devices.get(name, DeviceProfile(name)))
        devices[name] = _build(DeviceProfile, {**base, **_table(table, f"{where}: devices.{name}")},
                               f"{where}: devices.{name}")
    sections = {"model": ModelShape, "network": NetworkSpec, "churn": ChurnSpec, "day_night": DayNight,
                "cloud": CloudSpec, "clients": ClientSpec, "balance": BalanceSpec, "checks": ChecksSpec,
                "hostile": HostileSpec, "fetch": FetchSpec, "nat": NatSpec}
    built: dict[str, Any] = {name: _build(cls, _table(raw.pop(name, {}), f"{where}: {name}"), f"{where}: {name}")
                             for name, cls in sections.items()}
    events = tuple(_event(e, f"{where}: events[{i}]") for i, e in enumerate(raw.pop("events", [])))
    regions = {str(k): float(v) for k, v in _table(raw.pop("regions", {"home": 1.0}), f"{where}: regions").items()}
    raw.setdefault("name", default_name)
    scenario = _build(Scenario, {**raw, **built, "devices": devices, "events": events, "regions": regions}, where)
    _check(scenario, where)
    return scenario


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ScenarioError(where, f"must be a table, not {type(value).__name__}")
    return value


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    """`cls(**raw)`, with durations parsed ("think" fills `think_s`) and unknown keys refused."""
    by_key = {(f.name[:-2] if f.metadata.get("duration") else f.name): f for f in fields(cls)}
    if len(by_key) != len(fields(cls)):
        raise TypeError(f"{cls.__name__}: a duration field's key collides with another field's name")
    unknown = sorted(set(raw) - set(by_key) - {f.name for f in fields(cls)})
    if unknown:
        raise ScenarioError(where, f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(by_key))}")
    values = {}
    for key, value in raw.items():
        spec = by_key.get(key) or next(f for f in fields(cls) if f.name == key)
        values[spec.name] = parse_duration(value, f"{where}.{key}") if spec.metadata.get("duration") else value
    try:
        return cls(**values)
    except TypeError as err:
        raise ScenarioError(where, str(err)) from err


def _event(raw: Any, where: str) -> Event:
    raw = dict(_table(raw, where))
    kind = raw.pop("kind", None)
    if kind not in EVENT_KINDS:
        raise ScenarioError(where, f"kind must be one of {', '.join(EVENT_KINDS)}, not {kind!r}")
    if "at" not in raw:
        raise ScenarioError(where, "needs `at` (a duration like 30m, or a share of the run like 25%)")
    known = {f.name for f in fields(Event)} - {"kind"}
    if set(raw) - known:
        raise ScenarioError(where, f"unknown key(s) {', '.join(sorted(set(raw) - known))}")
    values: dict[str, Any] = {"kind": kind}
    for key, value in raw.items():
        if key in ("at", "duration", "think", "interval"):
            values[key] = Moment.parse(value, f"{where}.{key}")
        elif key == "regions":
            values[key] = tuple(str(r) for r in value)
        elif key in ("crowd", "share"):
            values[key] = float(value)
        else:
            values[key] = int(value)
    return Event(**values)


def _check(s: Scenario, where: str) -> None:
    if s.compute not in ("cost", "torch"):
        raise ScenarioError(where, f"compute must be 'cost' or 'torch', not {s.compute!r}")
    if not s.regions or any(w < 0 for w in s.regions.values()) or sum(s.regions.values()) <= 0:
        raise ScenarioError(f"{where}: regions", "need at least one region with a positive weight")
    if not any(d.weight > 0 for d in s.devices.values()):
        raise ScenarioError(f"{where}: devices", "no device profile has a positive weight for household nodes")
    s.device(s.cloud.device)
    s.device(s.clients.device)
    for region in [*s.cloud.regions, *(r for e in s.events for r in e.regions)]:
        if region not in s.regions:
            raise ScenarioError(where, f"region {region!r} is not one of {', '.join(s.regions)}")
    if s.churn.shape <= 0 or s.churn.median_s <= 0:
        raise ScenarioError(f"{where}: churn", "shape and median must be positive")
    for name, (low, high) in (("prompt_tokens", s.clients.prompt_tokens), ("new_tokens", s.clients.new_tokens)):
        if not 1 <= low <= high:
            raise ScenarioError(f"{where}: clients.{name}", f"needs 1 <= low <= high, got [{low}, {high}]")
    if s.clients.prompt_tokens[1] + s.clients.new_tokens[1] > s.model.max_length:
        raise ScenarioError(f"{where}: clients", f"prompts plus new tokens exceed model.max_length {s.model.max_length}")
    if not 0 <= s.clients.verify_rate <= 1:
        raise ScenarioError(f"{where}: clients", f"verify_rate must be in [0, 1], got {s.clients.verify_rate}")
    if not isinstance(s.clients.speculative, bool):
        raise ScenarioError(f"{where}: clients", f"speculative must be true or false, got {s.clients.speculative!r}")
    if not 1 <= s.clients.max_drafts <= 15:  # mesh.speculative.MAX_DRAFTS: the token and its drafts fit a row-exact step
        raise ScenarioError(f"{where}: clients", f"max_drafts must be in [1, 15], got {s.clients.max_drafts}")
    if not 0 <= s.clients.draft_acceptance <= 1:
        raise ScenarioError(f"{where}: clients", f"draft_acceptance must be in [0, 1], got {s.clients.draft_acceptance}")
    if s.duration_s <= 0:
        raise ScenarioError(where, "duration must be positive")
    if s.balance.spans not in SPAN_POLICIES:
        raise ScenarioError(f"{where}: balance", f"spans must be one of {', '.join(SPAN_POLICIES)}, not {s.balance.spans!r}")
    if s.balance.every_s <= 0 or s.balance.threshold < 0:
        raise ScenarioError(f"{where}: balance", "every must be positive and threshold >= 0")
    _check_hostile(s.hostile, f"{where}: hostile")
    if s.hostile.rewind_tokens > s.model.max_length:
        raise ScenarioError(f"{where}: hostile", f"rewind_tokens {s.hostile.rewind_tokens} exceed model.max_length "
                            f"{s.model.max_length}")
    s.device(s.hostile.device)
    _check_fetch(s, f"{where}: fetch")
    _check_nat(s, f"{where}: nat")
    for event in s.events:
        if event.kind == "mass-departure" and not 0 < event.share <= 1:
            raise ScenarioError(f"{where}: events", f"mass-departure needs 0 < share <= 1, got {event.share}")
        if event.kind == "relay-failure" and (s.nat.relays == 0 or not 0 <= event.hosts <= s.nat.relays):
            raise ScenarioError(f"{where}: events", f"relay-failure needs nat.relays >= 1 and 0 <= hosts <= "
                                f"nat.relays = {s.nat.relays}, got hosts {event.hosts}")


def _check_nat(s: Scenario, where: str) -> None:
    n = s.nat
    for name in ("households", "clients"):
        value = getattr(n, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ScenarioError(where, f"{name} is the share behind NAT, in [0, 1]; got {value!r}")
    if not isinstance(n.types, dict) or set(n.types) - set(NAT_TYPES) \
            or any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in n.types.values()) \
            or sum(n.types.values()) <= 0:
        raise ScenarioError(where, f"types maps some of {', '.join(NAT_TYPES)} to weights >= 0, not all 0; "
                            f"got {n.types!r}")
    for name in ("relays", "want_relays", "bootstrap"):
        value = getattr(n, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ScenarioError(where, f"{name} must be a whole number >= 0, got {value!r}")
    if not isinstance(n.public_relay, bool):
        raise ScenarioError(where, f"public_relay must be true or false, got {n.public_relay!r}")
    if n.punch not in PUNCH_MODES:
        raise ScenarioError(where, f"punch must be one of {', '.join(PUNCH_MODES)}, not {n.punch!r}")
    if n.check_every_s <= 0 or n.watch_every_s <= 0:
        raise ScenarioError(where, "check_every and watch_every must be positive")
    if n.households > 0 and n.relays == 0 and not n.public_relay:
        raise ScenarioError(where, "households behind NAT need relays: set relays >= 1 or public_relay = true")
    s.device(n.relay_device)


def _check_fetch(s: Scenario, where: str) -> None:
    f = s.fetch
    if not 0 <= f.seeds <= s.churn.nodes:
        raise ScenarioError(where, f"seeds must be in [0, churn.nodes = {s.churn.nodes}], got {f.seeds}")
    if f.seed_device:
        s.device(f.seed_device)
    if not 64 << 10 <= f.piece_bytes <= 64 << 20 or f.piece_bytes & (f.piece_bytes - 1):
        raise ScenarioError(where, f"piece must be a power of two from 64KiB to 64MiB, got {f.piece!r}")
    if f.upload_bytes_per_s <= 0:  # parse_size refuses it first; this reads it once, at load
        raise ScenarioError(where, f"upload must be positive, got {f.upload!r}")
    if min(f.upload_streams, f.upload_streams_per_peer, f.streams, f.streams_per_peer) < 1 or f.bytes_per_param <= 0:
        raise ScenarioError(where, "stream limits must be at least 1 and bytes_per_param positive")
    if f.seeds and any(d.uplink_mbps <= 0 or d.downlink_mbps <= 0 for d in s.devices.values()):
        raise ScenarioError(f"{where.rsplit(':', 1)[0]}: devices", "downloads need every device's uplink_mbps and "
                            "downlink_mbps positive")


def _check_hostile(h: HostileSpec, where: str) -> None:
    if not 0 <= h.fraction < 1:
        raise ScenarioError(where, f"fraction must be in [0, 1), got {h.fraction}")
    unknown = sorted(set(h.behaviours) - set(HOSTILE_BEHAVIOURS))
    if unknown or not h.behaviours:
        raise ScenarioError(where, f"behaviours must be some of {', '.join(HOSTILE_BEHAVIOURS)}, got {h.behaviours}")
    low, high = h.stall_frames
    if not 0 <= low <= high:
        raise ScenarioError(where, f"stall_frames needs 0 <= low <= high, got [{low}, {high}]")
    if h.lie <= 0 or not 0 <= h.half_frame <= 1 or h.hoard_targets < 0 or h.hoard_sessions < 0 or h.rewind_tokens < 0:
        raise ScenarioError(where, "lie must be positive, half_frame in [0, 1], hoard_targets, hoard_sessions and "
                            "rewind_tokens >= 0")
    if min(h.forge_every_s, h.keepalive_s, h.retarget_s) <= 0:
        raise ScenarioError(where, "forge_every, keepalive and retarget must be positive")
    if h.corrupt <= 0 or not 0 < h.corrupt_probability <= 1:
        raise ScenarioError(where, "corrupt must be positive and corrupt_probability in (0, 1]")


def hostile_hosts(s: Scenario) -> int:
    """How many hostile hosts join: `fraction` of the swarm at the start (honest and hostile)."""
    f = s.hostile.fraction
    return round((s.churn.nodes + s.cloud.nodes) * f / (1 - f)) if f > 0 else 0
