"""The network simulator: the real node and client code over a virtual network in virtual time.

    python -m simulations run steady --nodes 100 --clients 20 --duration 2h --out sim-out/steady

Modules, from the bottom up: `scenario` (TOML -> typed config), `churn` (pure: Weibull sessions,
Poisson arrivals, the day, span placement), `compute` (cost-model spans with exact stand-in
activations; `TimedSpan` for real torch blocks), `model` (what the swarm serves), `network` (the
in-memory transport's network with regions, access links, loss, partitions, clogs), `hosts`
(real `node.Node`s that arrive, serve and leave), `users` (real `mesh.Client`s and the outcome of
every session), `faults` (scheduled events), `world` (one run), `runner` (deterministic
`trio.run` under `mesh.virtual_time.VirtualClock`), `trace`, `report`, `plots`, `progress`.
"""
