"""`SyncClient`: the client library for code that is not async.

It runs trio in a background thread that holds the libp2p host and the `Client`; each call
hands a coroutine to that thread and blocks until it finishes, and `generate` yields tokens as
they arrive. Use it as a context manager so the thread and its host are shut down.

    with SyncClient(bootstrap=["/ip4/.../p2p/..."], model="path/to/model") as client:
        for token in client.generate("def fibonacci(n):", max_new_tokens=32):
            print(token.text, end="", flush=True)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import trio

from mesh.client import Client, ClientOptions, GenerationReport
from shard.generate import Emitted
from shard.sampling import SamplingParams

START_TIMEOUT_S = 60.0


class SyncClient:
    def __init__(self, *, bootstrap: Sequence[str], model: str | Path, options: ClientOptions = ClientOptions()):
        self._args = (list(bootstrap), model, options)
        self._client: Client | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._closed: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hearth-client", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise TimeoutError(f"the client did not join the swarm within {START_TIMEOUT_S:g} s")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as err:  # reported to the constructor, or lost after close
            self._error = err
            self._ready.set()

    async def _main(self) -> None:
        from mesh.join import connect

        bootstrap, model, options = self._args
        self._closed = trio.Event()
        async with connect(bootstrap=bootstrap, model=model, options=options) as client:
            self._client, self._token = client, trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._closed.wait()

    @property
    def client(self) -> Client:
        return self._client

    def generate(self, prompt: str | None = None, *, report: GenerationReport | None = None,
                 **kwargs) -> Iterator[Emitted]:
        """Tokens of one completion as they arrive; same arguments as `Client.generate`,
        plus sampling fields (`max_new_tokens=`, `temperature=`, ...) as keywords."""
        params = _params(kwargs)
        stream = self._client.generate(prompt, params=params, report=report, **kwargs)
        try:
            while True:
                try:
                    yield trio.from_thread.run(stream.__anext__, trio_token=self._token)
                except StopAsyncIteration:
                    return
        finally:
            trio.from_thread.run(stream.aclose, trio_token=self._token)

    def generate_text(self, prompt: str | None = None, **kwargs) -> GenerationReport:
        params = _params(kwargs)
        return trio.from_thread.run(lambda: self._client.generate_text(prompt, params=params, **kwargs),
                                    trio_token=self._token)

    def close(self) -> None:
        if self._token is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._closed.set, trio_token=self._token)
        self._thread.join(timeout=30)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _params(kwargs: dict) -> SamplingParams:
    fields = {name: kwargs.pop(name) for name in list(kwargs) if name in SamplingParams.__dataclass_fields__}
    return kwargs.pop("params", None) or SamplingParams(**fields)
