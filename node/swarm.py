"""Node daemons as child processes on this machine: `hearth swarm`, `hearth demo` and the tests.

Each node is a `hearth node` process in its own session (so a Ctrl-C reaches us, and we stop the
children ourselves). Readiness is the node's `listening on` line, never a fixed sleep; stopping
is SIGTERM, then SIGKILL after a grace period, always by process id.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from shard.config import load_config
from shard.pipeline import split_points

READY_PREFIX = "listening on "
HOST_LISTEN = "/ip4/0.0.0.0/tcp/4001"  # the README's form, for nodes on hosts of their own
LOOPBACK_LISTEN = "/ip4/127.0.0.1/tcp/0"  # nodes sharing this machine (demo, tests): nothing beyond it


class NodeStartError(RuntimeError):
    """A node process exited or stayed silent before it was ready; carries its output."""


class Host(Protocol):
    """Where a node process runs: this machine, or a host of a test bed (`tools/netbed.py`)."""

    def command(self, argv: list[str]) -> list[str]:
        """`argv` as run on this host (the process id stays argv's own)."""

    def env(self) -> dict[str, str]:
        """The environment of processes on this host."""


class NodeProcess:
    def __init__(self, name: str, args: list[str], *, env: dict[str, str] | None = None, host: Host | None = None):
        self.name, self.args, self.host = name, args, host
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        argv = [sys.executable, "-m", "node.cli", "node", *args]
        self.process = subprocess.Popen(
            host.command(argv) if host else argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, start_new_session=True, env=env if env is not None or host is None else host.env())
        self._reader = threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True)
        self._reader.start()
        self.addr: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def peer_id(self) -> str:
        return self.addr.rsplit("/p2p/", 1)[-1] if self.addr else ""

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, prefix: str, timeout: float) -> str:
        """The first output line starting with `prefix` (waiting up to `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        for line in self.lines:
            if line.startswith(prefix):
                return line
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                raise NodeStartError(f"node {self.name} exited ({self.process.wait()}):\n" + "\n".join(self.lines[-20:]))
            if line.startswith(prefix):
                return line
        raise NodeStartError(f"node {self.name} printed no {prefix!r} within {timeout:g} s:\n" + "\n".join(self.lines[-20:]))

    def wait_ready(self, timeout: float = 120.0) -> str:
        self.addr = self.wait_for(READY_PREFIX, timeout)[len(READY_PREFIX):].strip()
        return self.addr

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signum)

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM (the node drains), then SIGKILL if it has not exited within `grace` seconds."""
        self.signal(signal.SIGCONT)  # a frozen node cannot handle SIGTERM
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.wait()

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.process.wait()


class LocalSwarm:
    """N nodes splitting a model's blocks; the first is everyone's bootstrap peer. On this machine's
    loopback, or with `hosts`, node i on host i (round robin) listening on every interface at port
    4001, the way the README starts a household's nodes; a `--listen` in the extra arguments wins."""

    def __init__(self, model_dir: str | Path, *, quant: str = "none", extra_args: list[str] | None = None,
                 work_dir: str | Path | None = None, hosts: Sequence[Host] = ()):
        self.model_dir, self.quant = Path(model_dir), quant
        self.extra_args = extra_args or []
        self.work_dir = Path(work_dir) if work_dir else None
        self.hosts = list(hosts)
        self.nodes: list[NodeProcess] = []

    @property
    def bootstrap(self) -> list[str]:
        return [node.addr for node in self.nodes if node.addr and node.process.poll() is None][:1]

    def spans(self, n_nodes: int) -> list[tuple[int, int]]:
        return split_points(load_config(self.model_dir).num_layers, n_nodes)

    def start(self, spans: list[tuple[int, int]], *, timeout: float = 120.0) -> list[NodeProcess]:
        """Start one node per span (the first alone, then the rest at once) and wait until all serve."""
        started = []
        for index, (start, end) in enumerate(spans):
            node = self.add(start, end)
            started.append(node)
            if index == 0 and not self.bootstrap:
                node.wait_ready(timeout)
        for node in started:
            node.wait_ready(timeout)
        return started

    def add(self, start: int | None, end: int | None, *, extra_args: list[str] | None = None) -> NodeProcess:
        """Start (without waiting for) one node serving [start, end), or choosing its blocks itself
        when they are None; `extra_args` are for it alone."""
        name = f"node{len(self.nodes)}"
        blocks = [] if start is None else ["--blocks", f"{start}:{end}"]
        args = ["--model", str(self.model_dir), *blocks, "--quant", self.quant, *self.extra_args, *(extra_args or [])]
        for addr in self.bootstrap:
            args += ["--bootstrap", addr]
        if self.work_dir is not None:
            args += ["--identity", str(self.work_dir / f"{name}.key"), "--peer-cache", str(self.work_dir / f"{name}.peers.json")]
        host = self.hosts[len(self.nodes) % len(self.hosts)] if self.hosts else None
        if "--listen" not in args:
            args += ["--listen", HOST_LISTEN if host is not None else LOOPBACK_LISTEN]
        node = NodeProcess(name, args, host=host)
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.signal(signal.SIGCONT)
            node.signal(signal.SIGTERM)
        for node in self.nodes:
            try:
                node.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.kill()

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
