"""The network as a participant sees it: transports, discovery, routing and the client.

    async with mesh.connect(bootstrap=[...], model=DIR) as client:
        async for token in client.generate("def fibonacci(n):"):
            ...

`mesh.SyncClient` is the same for code that is not async. Both are imported on first use, so
`import mesh.routing` stays light.
"""

_LAZY = {"connect": ("mesh.join", "connect"), "SyncClient": ("mesh.sync_client", "SyncClient"),
         "Client": ("mesh.client", "Client"), "ClientOptions": ("mesh.client", "ClientOptions"),
         "NoRouteError": ("mesh.routing", "NoRouteError")}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'mesh' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)


__all__ = list(_LAZY)
