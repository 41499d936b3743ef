"""Decode speed across homes: direct, hole-punched and relayed hops against loopback, in one run.

Builds a random Llama (default h512, 8 layers, vocab 32000; or takes --model DIR) and starts four
2-node swarms, each node serving half of the blocks (`hearth node --quant int8 --threads 1`), and
five clients, one per arm, all at once:

  loopback      both nodes and the client on this machine's 127.0.0.1 (the baseline);
  direct        the nodes on two public hosts of a test bed (tools/netbed.py), the client on a
                third: one plain LAN, no NAT; steps on the node's sealed TCP data channel;
  direct-libp2p a second client of the direct arm's nodes, on the same host, with the data channel
                off (steps on libp2p streams): the control for the two below, since a hop
                reached through a NAT or a relay never gets the data channel;
  hole-punched  two `hearth relay` processes on public hosts, the nodes in two homes behind cone
                NATs, the client in a third cone home: the client reaches each node through a
                relay, then hole-punches it (its hops must report path "hole-punched");
  relayed       the same with symmetric NATs, where no punch can work: every step goes through a
                relay (path "relayed").

Each arm's topology is started once (a test bed of its own; beds coexist), as
tests/integration/test_nat.py starts a swarm across homes: the nodes wait for "reachable through 2
relays" and announce a "/p2p-circuit/" address. Each client is this script run with --worker inside
its host's network namespace: it connects once, warms up with a short generation, then on each
request generates --tokens tokens greedily after the same --prompt-tokens-token random prompt,
timing every token after the first (decode only) and, per decode step, each hop's round trip less
the compute its node reported (the wire cost of the hop: encoding, the way there and back,
decoding). Activations travel as fp16 (--codec fp16, the default; --codec auto lets each session
pick, and the codecs seen are printed either way). The arms alternate within each of --rounds
rounds, in ABBA order (the machine is shared and noisy): every figure is read as a ratio against the loopback arm
of the same run. Every arm must produce the same token ids, and each arm's hops the path its
topology implies; the script says so and exits 1 where one does not.

Every process it starts is stopped, then killed, by process id, and every test bed brought down,
also on errors, Ctrl-C and SIGTERM (exit 130); every wait is bounded. --arms runs a subset.
--record writes the table to benchmarks/RESULTS.md (benchmarks/results.py), replacing the section
"Across homes: direct, hole-punched and relayed hops (issue 24)". Needs root, `ip` and `nft` (exits 2 without them).

    python benchmarks/bench_nat.py [--model DIR] [--hidden 512] [--layers 8] [--quant int8] [--codec fp16]
                                   [--tokens 48] [--rounds 4] [--prompt-tokens 32] [--arms ...] [--record]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.swarm import HOST_LISTEN, LOOPBACK_LISTEN, NodeProcess  # noqa: E402
from protocol import Codec  # noqa: E402

ARMS = ("loopback", "direct", "direct-libp2p", "hole-punched", "relayed")
EXPECTED_PATH = {"loopback": "direct", "direct": "direct", "direct-libp2p": "direct", "hole-punched": "hole-punched",
                 "relayed": "relayed"}
NAT_OF = {"hole-punched": "cone", "relayed": "symmetric"}
RELAYED_BOTH = "reachable through 2 relays"
SECTION = "## Across homes: direct, hole-punched and relayed hops (issue 24)"
START_TIMEOUT_S = 300.0  # a node loading, a relay slot taken, a client connecting and warming up
GENERATE_TIMEOUT_S = 300.0  # one measured generation


# ---------------------------------------------------------------------------------------------
# the client: run with --worker inside a host's namespace


async def worker(args: argparse.Namespace) -> None:
    """Connect, warm up, then one generation per "go" line on stdin; one JSON object per line out."""
    import torch

    from mesh.client import ClientOptions, GenerationReport
    from mesh.join import connect
    from mesh.session import HopSession
    from protocol import AUTO
    from shard.config import load_config
    from shard.sampling import SamplingParams

    codecs: dict[str, set[str]] = {}  # peer -> the codecs its sessions' steps used
    channels: dict[str, set[str]] = {}  # peer -> what carried them: the node's data channel or libp2p
    original_step = HopSession.step

    async def step(self, *a, **kw):
        codecs.setdefault(self.peer_id, set()).add(self.codec.name)
        sealed = type(self.stream.raw).__name__ == "SealedStream"
        channels.setdefault(self.peer_id, set()).add("data channel" if sealed else "libp2p")
        return await original_step(self, *a, **kw)

    HopSession.step = step
    vocab = load_config(args.model).vocab_size
    prompt = torch.randint(3, vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    codec = AUTO if args.codec == "auto" else Codec[args.codec.upper()]
    options = ClientOptions(codec=codec, request_timeout_s=GENERATE_TIMEOUT_S, data_channel=not args.libp2p_only)
    async with connect(bootstrap=args.bootstrap, model=args.model, options=options) as client:
        warm = GenerationReport([])
        async for _ in client.generate(prompt_ids=prompt[:8], params=SamplingParams(max_new_tokens=4), report=warm):
            pass
        say(event="ready", paths=[h.path for h in warm.hops])
        while (await trio.to_thread.run_sync(sys.stdin.readline)).strip() == "go":
            codecs.clear()
            channels.clear()
            report, step_s, snapshots = GenerationReport([]), [], []
            started = time.perf_counter()
            async for _ in client.generate(prompt_ids=prompt, params=SamplingParams(max_new_tokens=args.tokens),
                                           report=report):
                now = time.perf_counter()
                step_s.append(now - started)
                started = now
                snapshots.append([(h.total_s, h.compute_s) for h in report.hops])
            hops = []
            for j, hop in enumerate(report.hops):  # per decode step: round trip less the node's compute
                wire = [(b[j][0] - a[j][0]) - (b[j][1] - a[j][1]) for a, b in zip(snapshots, snapshots[1:])]
                compute = [b[j][1] - a[j][1] for a, b in zip(snapshots, snapshots[1:])]
                hops.append({"peer_id": hop.peer_id, "start": hop.start, "end": hop.end, "path": hop.path,
                             "codecs": sorted(codecs.get(hop.peer_id, ())),
                             "channels": sorted(channels.get(hop.peer_id, ())), "wire_s": wire, "compute_s": compute})
            say(event="result", token_ids=report.token_ids, decode_s=step_s[1:], hops=hops,
                recoveries=len(report.recoveries))


def say(**event) -> None:
    print(json.dumps(event), flush=True)


# ---------------------------------------------------------------------------------------------
# the benchmark


@dataclass
class Client:
    """One arm's --worker process, driven over its stdin and stdout."""

    arm: str
    process: trio.Process
    unread: bytes = b""
    ready: dict = field(default_factory=dict)

    async def event(self, timeout: float) -> dict:
        with trio.fail_after(timeout):
            while b"\n" not in self.unread:
                chunk = await self.process.stdout.receive_some()
                if not chunk:
                    await self.process.wait()
                    raise RuntimeError(f"{self.arm} client exited ({self.process.returncode}); its stderr is above")
                self.unread += chunk
        line, self.unread = self.unread.split(b"\n", 1)
        return json.loads(line)

    async def generate(self) -> dict:
        await self.process.stdin.send_all(b"go\n")
        while (event := await self.event(GENERATE_TIMEOUT_S))["event"] != "result":
            pass
        return event

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()  # by process id (`ip netns exec` execs the worker: the id is its own)
        with trio.move_on_after(10):
            await self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(Exception):
                await stream.aclose()


@dataclass
class Arm:
    name: str
    nodes: list[NodeProcess] = field(default_factory=list)
    relays: list[NodeProcess] = field(default_factory=list)
    client: Client | None = None
    client_host: object = None  # a tools.netbed.Host, or None: this machine
    bootstrap: list[str] = field(default_factory=list)
    where: str = ""
    decode_s: list[float] = field(default_factory=list)
    wire_s: list[list[float]] = field(default_factory=list)  # per hop, every decode step of every round
    compute_s: list[list[float]] = field(default_factory=list)
    paths: list[set[str]] = field(default_factory=list)
    codecs: set[str] = field(default_factory=set)
    channels: list[set[str]] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    recoveries: int = 0


class Bench:
    def __init__(self, args: argparse.Namespace, model_dir: Path, work: Path, nursery: trio.Nursery,
                 stack: contextlib.ExitStack):
        self.args, self.model_dir, self.work, self.nursery, self.stack = args, model_dir, work, nursery, stack
        self.processes: list[NodeProcess] = []
        self.clients: list[Client] = []
        from shard.config import load_config
        from shard.pipeline import split_points

        self.spans = split_points(load_config(model_dir).num_layers, 2)

    async def start_process(self, name: str, args: list[str], host, command: str = "node") -> NodeProcess:
        keys = ["--identity", str(self.work / f"{name}.key")]
        if command == "node":
            keys += ["--peer-cache", str(self.work / f"{name}.peers.json")]
        process = await NodeProcess.start(self.nursery, name, [*args, *keys], host=host, command=command)
        self.processes.append(process)
        return process

    def node_args(self, span: tuple[int, int], listen: str, bootstrap: list[str]) -> list[str]:
        return ["--model", str(self.model_dir), "--blocks", f"{span[0]}:{span[1]}", "--quant", self.args.quant,
                "--threads", "1", "--listen", listen, *[a for addr in bootstrap for a in ("--bootstrap", addr)]]

    async def start_arm(self, name: str, started: dict[str, Arm]) -> Arm:
        arm = Arm(name)
        if name == "direct-libp2p" and "direct" in started:  # the direct arm's nodes, a client of its own
            direct = started["direct"]
            arm.where, arm.client_host, arm.bootstrap = direct.where, direct.client_host, direct.bootstrap
            arm.where += " (the direct arm's nodes and host)"
            return await self.start_client(arm)
        if name == "loopback":
            hosts, client_host, listen = [None, None], None, LOOPBACK_LISTEN
            arm.where = "nodes and client on 127.0.0.1"
        elif name in ("direct", "direct-libp2p"):
            bed = self.bed(3, [])
            hosts, client_host, listen = bed.hosts[:2], bed.hosts[2], HOST_LISTEN
            arm.where = f"nodes on {hosts[0].addr} and {hosts[1].addr}, client on {client_host.addr} (one LAN)"
        else:
            from tools.netbed import Home

            nat = NAT_OF[name]
            bed = self.bed(2, [Home(nat=nat)] * 3)
            first, second, home_a, home_b, client_host = bed.hosts
            hosts, listen = [home_a, home_b], HOST_LISTEN
            arm.where = (f"relays on {first.addr}, {second.addr}; nodes in {nat} homes behind {home_a.public_addr}, "
                         f"{home_b.public_addr}; client in a {nat} home behind {client_host.public_addr}")
            arm.relays.append(await self.start_process(f"{name}-relay1", ["--listen", HOST_LISTEN], first, "relay"))
            await arm.relays[0].wait_ready(START_TIMEOUT_S)
            arm.relays.append(await self.start_process(
                f"{name}-relay2", ["--listen", HOST_LISTEN, "--bootstrap", arm.relays[0].addr], second, "relay"))
            await arm.relays[1].wait_ready(START_TIMEOUT_S)
        bootstrap = [relay.addr for relay in arm.relays]
        for index, (span, host) in enumerate(zip(self.spans, hosts)):
            node = await self.start_process(f"{name}-node{index}", self.node_args(span, listen, bootstrap), host)
            arm.nodes.append(node)
            await node.wait_ready(START_TIMEOUT_S)
            if not arm.relays:
                bootstrap = [arm.nodes[0].addr]  # the first node is the second's and the client's bootstrap
        if arm.relays:
            for node in arm.nodes:  # holding a slot on both relays, and announcing a relayed address
                await node.wait_for_text(RELAYED_BOTH, START_TIMEOUT_S)
                await node.wait_for_text("/p2p-circuit/", 60)
        arm.client_host, arm.bootstrap = client_host, bootstrap
        return await self.start_client(arm)

    def bed(self, hosts: int, homes: list):
        from tools.netbed import NetBed

        return self.stack.enter_context(NetBed(hosts, homes=homes))

    async def start_client(self, arm: Arm) -> Arm:
        """The arm's --worker process on its client host, connected and warmed up."""
        host = arm.client_host
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", str(self.model_dir),
                "--codec", self.args.codec, "--tokens", str(self.args.tokens),
                "--prompt-tokens", str(self.args.prompt_tokens), *[a for b in arm.bootstrap for a in ("--bootstrap", b)],
                *(["--libp2p-only"] if arm.name == "direct-libp2p" else [])]
        process = await trio.lowlevel.open_process(
            host.command(argv) if host else argv, env=host.env() if host else None, cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)  # stderr: ours
        arm.client = Client(arm.name, process)
        self.clients.append(arm.client)
        arm.client.ready = await arm.client.event(START_TIMEOUT_S)
        print(f"{arm.name}: {arm.where}; warm-up hop paths {arm.client.ready['paths']}", flush=True)
        return arm

    async def stop(self) -> None:
        """Every client killed, every node and relay stopped (SIGTERM, then SIGKILL), by process id."""
        with trio.CancelScope(shield=True):
            for client in self.clients:
                await client.kill()
            for process in self.processes:
                process.signal(signal.SIGTERM)
            with trio.move_on_after(10):
                for process in self.processes:
                    await process.process.wait()
            for process in self.processes:
                if process.running:
                    with trio.move_on_after(15):
                        await process.kill()


async def run(args: argparse.Namespace) -> list[Arm]:
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as beds:
        os.chmod(tmp, 0o755)
        model_dir = model_or_build(args, tmp)
        async with trio.open_nursery() as nursery:  # the node processes' output readers
            nursery.start_soon(interrupt_on_sigterm)
            bench = Bench(args, model_dir, Path(tmp), nursery, beds)
            try:
                arms = {}
                for name in args.arms:
                    began = time.perf_counter()
                    arms[name] = await bench.start_arm(name, arms)
                    print(f"{name}: started in {time.perf_counter() - began:.0f} s", flush=True)
                for round_ in range(args.rounds):
                    order = list(arms.values()) if round_ % 2 == 0 else list(arms.values())[::-1]  # ABBA
                    for arm in order:
                        record(arm, await arm.client.generate())
                    print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(
                        f"{arm.name} {1 / statistics.median(arm.decode_s):.1f}" for arm in arms.values())
                        + " tok/s (medians so far)", flush=True)
            finally:
                await bench.stop()
                nursery.cancel_scope.cancel()
    return list(arms.values())  # the test beds are down and the model removed by now


async def interrupt_on_sigterm() -> None:
    """SIGTERM as Ctrl-C: the run is cancelled, and every process and test bed cleaned up."""
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            raise KeyboardInterrupt("SIGTERM")


def record(arm: Arm, result: dict) -> None:
    arm.decode_s += result["decode_s"]
    arm.token_ids.append(result["token_ids"])
    arm.recoveries += result["recoveries"]
    if not arm.wire_s:
        arm.wire_s = [[] for _ in result["hops"]]
        arm.compute_s = [[] for _ in result["hops"]]
        arm.paths = [set() for _ in result["hops"]]
        arm.channels = [set() for _ in result["hops"]]
    for j, hop in enumerate(result["hops"][:len(arm.wire_s)]):
        arm.wire_s[j] += hop["wire_s"]
        arm.compute_s[j] += hop["compute_s"]
        arm.paths[j].add(hop["path"])
        arm.codecs.update(hop["codecs"])
        arm.channels[j].update(hop["channels"])
    if len(result["hops"]) != len(arm.wire_s):
        arm.paths[-1].add(f"route of {len(result['hops'])} hops")


def model_or_build(args: argparse.Namespace, tmp: str) -> Path:
    from benchmarks.bench_local import model_or_build as build

    return build(args, tmp).resolve()


def report(arms: list[Arm], args: argparse.Namespace, model: str, seconds: float) -> tuple[list[str], bool]:
    """The table (as lines) and whether every check passed."""
    base = statistics.median(arms[0].decode_s) if arms[0].name == "loopback" else None
    reference = arms[0].token_ids[0]
    lines = [f"{model}, nodes --quant {args.quant} --threads 1, 2 nodes of {len(arms[0].wire_s)} hops; batch 1, "
             f"{args.prompt_tokens}-token prompt, greedy, {args.rounds} rounds x {args.tokens} tokens per arm "
             f"(arms alternating, ABBA); codec {args.codec} (seen: {', '.join(sorted(set().union(*(a.codecs for a in arms))))}); "
             f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end; {seconds:.0f} s in all", ""]
    lines.append(f"{'arm':<15}{'decode tok/s':>13}{'ms/token':>10}{'vs loopback':>13}{'wire ms/hop':>15}"
                 f"{'compute ms/hop':>16}  {'same tokens':<13}hop paths (steps carried by)")
    ok = True
    for arm in arms:
        median = statistics.median(arm.decode_s)
        ratio = f"{base / median:.2f}x" if base else "-"
        wire = " / ".join(f"{statistics.median(w) * 1e3:.2f}" for w in arm.wire_s)
        compute = " / ".join(f"{statistics.median(c) * 1e3:.1f}" for c in arm.compute_s)
        paths = " / ".join(f"{','.join(sorted(p))} ({','.join(sorted(c))})" for p, c in zip(arm.paths, arm.channels))
        same = all(ids == reference for ids in arm.token_ids)
        expected = all(p == {EXPECTED_PATH[arm.name]} for p in arm.paths)
        ok &= same and expected and not arm.recoveries
        lines.append(f"{arm.name:<15}{1 / median:>13.2f}{median * 1e3:>10.1f}{ratio:>13}{wire:>15}{compute:>16}  "
                     f"{str(same):<13}{paths}{'' if expected else '  EXPECTED ' + EXPECTED_PATH[arm.name]}"
                     f"{'' if not arm.recoveries else f'; {arm.recoveries} recoveries'}")
    lines += ["", "decode tok/s: 1 / the median seconds per token after the first, over every round; vs loopback: "
                  "the ratio of those medians",
              "wire ms/hop: the median, over every decode step, of the hop's round trip less the compute its node "
              "reported (first hop / second hop); compute likewise",
              "same tokens: every round's token ids equal to the first loopback round's"]
    if base:
        lines.append("extra ms per token vs loopback: " + ", ".join(
            f"{arm.name} {(statistics.median(arm.decode_s) - base) * 1e3:+.2f}" for arm in arms[1:]))
    return lines, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model directory (default: build a random Llama)")
    parser.add_argument("--hidden", type=int, default=512, help="of the random Llama")
    parser.add_argument("--layers", type=int, default=8, help="of the random Llama")
    parser.add_argument("--quant", default="int8", choices=("none", "int8", "int4"), help="the nodes' --quant")
    parser.add_argument("--codec", default="fp16", choices=[*(c.name.lower() for c in Codec), "auto"],
                        help="activations on the wire (auto: each session picks)")
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per generation")
    parser.add_argument("--rounds", type=int, default=4, help="each arm generates once per round")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS,
                        help="which arms (ratios need loopback first)")
    parser.add_argument("--record", action="store_true", help=f"write the figures to benchmarks/RESULTS.md ({SECTION[3:]})")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--libp2p-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        trio.run(worker, args)
        return 0
    if args.model is not None:
        args.model = args.model.resolve()
    from tools.netbed import NetBed

    reason = NetBed.unavailable(nat=True)
    if reason and set(args.arms) - {"loopback"}:
        print(f"bench_nat: skipped: test beds with NAT homes are unavailable here: {reason}", file=sys.stderr)
        return 2
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:  # started in the background: Ctrl-C's cleanup all the same
        signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle node processes must not spin on the cores
    began = time.perf_counter()
    interrupted = False
    try:
        arms = trio.run(run, args)
    except* KeyboardInterrupt:
        interrupted = True
    if interrupted:
        print("bench_nat: interrupted; every process it started is stopped and every test bed down", file=sys.stderr)
        return 130
    model = (f"model {args.model}" if args.model else
             f"random Llama h{args.hidden} L{args.layers} vocab 32000")
    lines, ok = report(arms, args, model, time.perf_counter() - began)
    print("\n" + "\n".join(lines), flush=True)
    if not ok:
        print("CHECK FAILED: an arm's tokens differ from loopback's, a hop took another path than its topology "
              "implies, or a hop was recovered", flush=True)
    if args.record:
        from benchmarks.results import write_section

        command = "python benchmarks/bench_nat.py " + " ".join(sys.argv[1:])
        write_section(f"{SECTION}\n\nCommand: `{command.strip()}` (as root; {time.strftime('%Y-%m-%d')})\n\n```\n"
                      + "\n".join(lines) + "\n```\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
