"""The layering contract holds for the shipped packages, and the checker catches each kind of breach."""

from __future__ import annotations

from pathlib import Path

from tests.layering.contract import FORBIDDEN, LAYERS, check, modules

ROOT = Path(__file__).resolve().parents[2]


def test_the_packages_keep_their_layers():
    assert all(modules(ROOT, package) for package in LAYERS)  # the checker sees every package
    violations = check(ROOT)
    assert not violations, "\n".join(map(str, violations))


def write(root: Path, files: dict[str, str]) -> Path:
    for package in LAYERS:
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").write_text('"""A package."""\n')
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_a_forbidden_import_fails_the_contract(tmp_path):
    root = write(tmp_path, {
        "mesh/client.py": "import numpy\n\ndef late():\n    import torch\n",  # torch in mesh, even inside a function
        "shard/loader.py": "from mesh.transport import Transport\n",  # upward: shard is below mesh
        "shard/fetch.py": "import trio\n",  # networking in shard
        "protocol/codec.py": "import time\n",  # a clock in the sans-IO layer
        "node/ok.py": "from mesh import client\nfrom shard.loader import x\n",  # downward: allowed
        "simulations/peek.py": "from tests.layering import contract\n",
    })
    found = {(v.module, v.imported.split(".")[0]) for v in check(root)}
    assert found == {("mesh.client", "torch"), ("shard.loader", "mesh"), ("shard.fetch", "trio"),
                     ("protocol.codec", "time"), ("simulations.peek", "tests")}
    message = "\n".join(map(str, check(root)))
    assert "mesh.client:4 imports torch: mesh must not use torch" in message
    assert "shard.loader:1 imports mesh.transport: shard is below mesh" in message


def test_an_import_cycle_within_a_package_fails_the_contract(tmp_path):
    root = write(tmp_path, {
        "shard/span.py": "from shard.batch import forward_batch\n",
        "shard/batch.py": "def f():\n    from shard import span\n",  # a lazy import still closes the loop
        "shard/head.py": "from shard.span import SpanModel\n",  # not part of the loop
    })
    cycles = [v for v in check(root) if v.rule.startswith("import cycle")]
    assert len(cycles) == 1 and "shard.batch -> shard.span -> shard.batch" in cycles[0].rule


def test_each_layer_names_what_it_keeps_out():
    assert {"torch", "trio", "time", "logging"} <= FORBIDDEN["protocol"]
    assert {"trio", "socket", "libp2p"} <= FORBIDDEN["shard"]
    assert all("torch" in FORBIDDEN[package] for package in ("mesh", "node", "simulations"))
