"""Node daemons as child processes on this machine: `hearth swarm`, `hearth demo` and the tests.

Each node is a `hearth node` process in its own session (so a Ctrl-C reaches us, and we stop the
children ourselves), started with trio's process support; a task in a nursery collects its output
lines. Readiness is the node's `listening on` line, never a fixed sleep; stopping is SIGTERM, then
SIGKILL after a grace period, always by process id. `LocalSwarm` is an async context manager that
stops every node it started on the way out, cancelled or not.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import trio

from shard.model_dir import open_model_dir
from shard.pipeline import split_points

READY_PREFIX = "listening on "
HOST_LISTEN = "/ip4/0.0.0.0/tcp/4001"  # the README's form, for nodes on hosts of their own
LOOPBACK_LISTEN = "/ip4/127.0.0.1/tcp/0"  # nodes sharing this machine (demo, tests): nothing beyond it
KEPT_LINES = 2000  # of each node's output
KILL_WAIT_S = 10.0  # for a SIGKILLed process to be gone


class NodeStartError(RuntimeError):
    """A node process exited or stayed silent before it was ready; carries its output."""


class Host(Protocol):
    """Where a node process runs: this machine, or a host of a test bed (`tools/netbed.py`)."""

    def command(self, argv: list[str]) -> list[str]:
        """`argv` as run on this host (the process id stays argv's own)."""

    def env(self) -> dict[str, str]:
        """The environment of processes on this host."""


class NodeProcess:
    """One `hearth node` child process and the last `KEPT_LINES` lines it printed (stdout and stderr)."""

    def __init__(self, name: str, args: list[str], process: trio.Process):
        self.name, self.args, self.process = name, args, process
        self.addr: str | None = None
        self._lines: deque[str] = deque(maxlen=KEPT_LINES)
        self._printed = 0  # lines ever printed, kept or not
        self._news = trio.Event()  # set when lines arrive or the output ends
        self._ended = False

    @classmethod
    async def start(cls, nursery: trio.Nursery, name: str, args: list[str], *, env: dict[str, str] | None = None,
                    host: Host | None = None, command: str = "node") -> NodeProcess:
        """Start `hearth node ARGS` (or another `command` that prints `listening on` lines, such as
        `relay`) on `host`, if given, and collect its output in a task of `nursery`."""
        argv = [sys.executable, "-m", "node.cli", command, *args]
        process = await trio.lowlevel.open_process(
            host.command(argv) if host else argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, env=env if env is not None or host is None else host.env())
        node = cls(name, args, process)
        nursery.start_soon(node._read)
        return node

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def peer_id(self) -> str:
        return self.addr.rsplit("/p2p/", 1)[-1] if self.addr else ""

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    @property
    def lines(self) -> list[str]:
        return list(self._lines)

    async def _read(self) -> None:
        unfinished = b""
        try:
            async with self.process.stdout as stdout:
                while chunk := await stdout.receive_some():
                    *complete, unfinished = (unfinished + chunk).split(b"\n")
                    self._add(complete)
            self._add([unfinished] if unfinished else [])
        finally:
            self._ended = True
            self._news.set()

    def _add(self, lines: list[bytes]) -> None:
        self._lines.extend(line.decode(errors="replace") for line in lines)
        self._printed += len(lines)
        self._news.set()
        self._news = trio.Event()

    def _tail(self) -> str:
        return "\n".join(list(self._lines)[-20:])

    async def wait_for(self, prefix: str, timeout: float) -> str:
        """The first kept output line starting with `prefix` (waiting up to `timeout` seconds); a
        node logging JSON (`--log-format json`) is read by each event's message."""
        checked = 0
        with trio.move_on_after(timeout):
            while True:
                fresh = min(self._printed - checked, len(self._lines))
                checked = self._printed
                for line in itertools.islice(self._lines, len(self._lines) - fresh, None):
                    if (line := message(line)).startswith(prefix):
                        return line
                if self._ended:
                    raise NodeStartError(f"node {self.name} exited ({await self.process.wait()}):\n" + self._tail())
                await self._news.wait()
        raise NodeStartError(f"node {self.name} printed no {prefix!r} within {timeout:g} s:\n" + self._tail())

    async def wait_for_text(self, text: str, timeout: float) -> str:
        """The first kept output line holding `text` anywhere (a `listening on` line with a relayed
        address, say), waiting up to `timeout` seconds; NodeStartError if it exits first or never."""
        with trio.move_on_after(timeout):
            while True:
                found = next((line for line in self._lines if text in line), None)
                if found is not None:
                    return found
                if self._ended:
                    raise NodeStartError(f"node {self.name} exited ({await self.process.wait()}):\n" + self._tail())
                await self._news.wait()
        raise NodeStartError(f"node {self.name} printed no line with {text!r} within {timeout:g} s:\n" + self._tail())

    async def wait_ready(self, timeout: float = 120.0) -> str:
        """The node's address, from its `listening on` line."""
        self.addr = (await self.wait_for(READY_PREFIX, timeout))[len(READY_PREFIX):].strip()
        return self.addr

    async def wait(self, timeout: float) -> int:
        """The exit status once the node has exited; trio.TooSlowError after `timeout` seconds."""
        with trio.fail_after(timeout):
            return await self.process.wait()

    def signal(self, signum: int) -> None:
        if self.running:
            os.kill(self.pid, signum)

    async def stop(self, grace: float = 10.0) -> int:
        """SIGTERM (the node drains), then SIGKILL if it has not exited within `grace` seconds."""
        self.signal(signal.SIGCONT)  # a frozen node cannot handle SIGTERM
        self.signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            return await self.process.wait()
        return await self.kill()

    async def kill(self) -> int:
        self.signal(signal.SIGKILL)
        return await self.wait(KILL_WAIT_S)


class LocalSwarm:
    """N nodes splitting a model's blocks; the first is everyone's bootstrap peer. On this machine's
    loopback, or with `hosts`, node i on host i (round robin) listening on every interface at port
    4001, the way the README starts a household's nodes; a `--listen` in the extra arguments wins.

    Use it as `async with LocalSwarm(...) as swarm:`; it owns the nursery of its nodes' output
    readers, and on the way out (a Ctrl-C or a cancellation included) stops every node it started."""

    def __init__(self, model_dir: str | Path, *, quant: str = "auto", extra_args: list[str] | None = None,
                 work_dir: str | Path | None = None, hosts: Sequence[Host] = ()):
        self.model_dir, self.quant = Path(model_dir), quant
        self.extra_args = extra_args or []
        self.work_dir = Path(work_dir) if work_dir else None
        self.hosts = list(hosts)
        self.nodes: list[NodeProcess] = []
        self._nursery: trio.Nursery | None = None  # of the output readers, while entered

    @property
    def bootstrap(self) -> list[str]:
        return [node.addr for node in self.nodes if node.addr and node.running][:1]

    def spans(self, n_nodes: int) -> list[tuple[int, int]]:
        return split_points(open_model_dir(self.model_dir, verify=False).config.num_layers, n_nodes)

    async def start(self, spans: list[tuple[int, int]], *, timeout: float = 120.0) -> list[NodeProcess]:
        """Start one node per span (the first alone, then the rest at once) and wait, `timeout`
        seconds in all, until all serve."""
        deadline = trio.current_time() + timeout
        started = []
        for index, (start, end) in enumerate(spans):
            started.append(await self.add(start, end))
            if index == 0 and not self.bootstrap:
                await started[0].wait_ready(deadline - trio.current_time())
        for node in started:
            await node.wait_ready(deadline - trio.current_time())
        return started

    async def add(self, start: int | None, end: int | None, *, extra_args: list[str] | None = None,
                  digest: str | None = None) -> NodeProcess:
        """Start (without waiting for) one node serving [start, end), or choosing its blocks itself
        when they are None; `extra_args` are for it alone. With `digest` the node has no files: it
        fetches the model from the swarm (`--model-digest`, into its own cache under `work_dir`)."""
        if self._nursery is None:
            raise RuntimeError("start nodes inside `async with LocalSwarm(...)`")
        name = f"node{len(self.nodes)}"
        blocks = [] if start is None else ["--blocks", f"{start}:{end}"]
        model = ["--model", str(self.model_dir)] if digest is None else ["--model-digest", digest]
        if digest is not None and self.work_dir is not None:
            model += ["--cache-dir", str(self.work_dir / f"{name}.cache")]
        args = [*model, *blocks, "--quant", self.quant, *self.extra_args, *(extra_args or [])]
        for addr in self.bootstrap:
            args += ["--bootstrap", addr]
        if self.work_dir is not None:
            args += ["--identity", str(self.work_dir / f"{name}.key"), "--peer-cache", str(self.work_dir / f"{name}.peers.json")]
        host = self.hosts[len(self.nodes) % len(self.hosts)] if self.hosts else None
        if "--listen" not in args:
            args += ["--listen", HOST_LISTEN if host is not None else LOOPBACK_LISTEN]
        node = await NodeProcess.start(self._nursery, name, args, host=host)
        self.nodes.append(node)
        return node

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every node at once, then SIGKILL those still running after `grace` seconds."""
        for node in self.nodes:
            node.signal(signal.SIGCONT)
            node.signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            for node in self.nodes:
                await node.process.wait()
        for node in self.nodes:
            if node.running:
                await node.kill()

    async def __aenter__(self) -> LocalSwarm:
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        return self

    async def __aexit__(self, *exc_info) -> None:
        try:
            with trio.CancelScope(shield=True):  # cancelled or interrupted, the nodes are still ours to stop
                await self.stop()
        finally:
            self._nursery.cancel_scope.cancel()  # the readers: nothing more worth reading
            self._nursery = None
            await self._nursery_manager.__aexit__(None, None, None)  # an error of the body stays the body's


def message(line: str) -> str:
    """An output line as text: a JSON event's message (`--log-format json`), else the line."""
    if line.startswith("{"):
        try:
            event = json.loads(line)
        except ValueError:
            return line
        if isinstance(event, dict) and isinstance(event.get("message"), str):
            return event["message"]
    return line
