"""Fixtures for tests that run real `hearth node` processes over libp2p on 127.0.0.1."""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio

from node.swarm import LocalSwarm
from shard.generate import generate_local
from shard.pipeline import LocalPipeline
from shard.sampling import SamplingParams

NODE_ARGS = ["--threads", "1", "--idle-timeout", "60"]


@pytest.fixture
async def local_swarm(checkpoint_factory, tmp_path):
    """A LocalSwarm of the tiny llama; every process it starts is stopped (then killed) at teardown."""
    async with LocalSwarm(checkpoint_factory("llama"), extra_args=NODE_ARGS, work_dir=tmp_path) as swarm:
        yield swarm
    assert not any(node.running for node in swarm.nodes)


async def run_command(argv: list[str], *, timeout: float = 120, **options) -> subprocess.CompletedProcess:
    """`argv` run to its end (killed after `timeout` seconds), its output captured as text."""
    with trio.fail_after(timeout):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False, **options)
    return subprocess.CompletedProcess(argv, done.returncode, done.stdout.decode(), done.stderr.decode())


def local_tokens(model_dir, prompt: list[int], n: int) -> list[int]:
    return generate_local(LocalPipeline.load(model_dir), prompt, SamplingParams(max_new_tokens=n)).token_ids


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    """The tiny llama with a tokenizer (byte-fallback BPE) and a chat template: text in, text out."""
    from tests.conftest import save_tiny_checkpoint
    from tests.shard.test_tokenizer import PLAIN_TEMPLATE, sentencepiece_tokenizer, write_model

    backend = sentencepiece_tokenizer()
    path = write_model(tmp_path_factory.mktemp("chat") / "tiny-chat", backend, {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": PLAIN_TEMPLATE})
    return save_tiny_checkpoint(path, "llama", vocab_size=backend.get_vocab_size(), eos_token_id=2)


@pytest.fixture
def netbed():
    """`netbed(hosts, lans=None, homes=())` builds a LAN of distinct hosts in network namespaces
    (tools/netbed.py), with `homes` (`tools.netbed.Home`) behind NAT routers on it; every process
    in them is killed and every namespace deleted at teardown, whatever the test did."""
    from tools.netbed import NetBed

    reason = NetBed.unavailable()
    if reason:
        pytest.skip(f"no test bed of network namespaces on this machine: {reason}")
    beds = []

    def make(hosts: int, lans: list[list[int]] | None = None, homes=()) -> NetBed:
        if homes and (reason := NetBed.unavailable(nat=True)):
            pytest.skip(f"no NAT routers (nftables) in network namespaces on this machine: {reason}")
        bed = NetBed(hosts, lans=lans, homes=homes).up()
        beds.append(bed)
        return bed

    try:
        yield make
    finally:
        for bed in beds:
            bed.down()


@pytest.fixture
def hosts_swarm_factory(tmp_path):
    """`factory(model_dir, bed)`: a LocalSwarm whose node i runs on host i of `bed`, listening on
    every interface at port 4001. The test enters it (`async with`), so its nodes are stopped before
    the test bed goes down."""

    def make(model_dir, bed, n_hosts: int | None = None) -> LocalSwarm:
        return LocalSwarm(model_dir, extra_args=NODE_ARGS, work_dir=tmp_path, hosts=bed.hosts[:n_hosts])

    return make


class TrioThread:
    """A trio run in a thread of its own, for what the tests of a module share: pytest-trio runs each
    test, and its async fixtures, in a trio run of its own. `serve(task_status=...)` sets up, reports
    `task_status.started(value)` and runs until `close()` cancels it; a test reaches objects of that
    run (a LocalSwarm's nodes) through `await run(...)` and `await run_sync(...)`."""

    def __init__(self, serve: Callable[..., Awaitable[None]], *, timeout: float):
        self._serve, self._timeout = serve, timeout
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="shared-trio-run", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.close()
            raise TimeoutError(f"not set up within {timeout:g} s")
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as err:  # reported to the constructor, or by close()
            self._error = err
        finally:
            self._ready.set()

    async def _run(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._cancel = nursery.cancel_scope
            self.value = await nursery.start(self._serve)
            self._ready.set()

    async def run(self, afn: Callable[..., Awaitable], *args):
        """`await afn(*args)` in this thread's trio run, from another run."""
        return await trio.to_thread.run_sync(partial(trio.from_thread.run, afn, *args, trio_token=self._token))

    async def run_sync(self, fn: Callable, *args):
        """`fn(*args)` in this thread's trio run, from another run."""
        return await trio.to_thread.run_sync(partial(trio.from_thread.run_sync, fn, *args, trio_token=self._token))

    def close(self) -> None:
        """Cancel `serve` (its context managers exit) and wait for the thread."""
        with contextlib.suppress(trio.RunFinishedError):  # serve ended by itself: its error follows
            trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        self._thread.join(self._timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"not torn down within {self._timeout:g} s")
        if self._error is not None:
            raise self._error
