"""`protocol` stays sans-IO: no trio, torch, time, logging, sockets or global randomness."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "protocol"
FORBIDDEN = {"trio", "torch", "time", "logging", "socket", "asyncio", "threading", "os",
             "shard", "mesh", "node", "simulations", "tests"}
ALLOWED_RANDOM = {"fuzzing.py"}  # takes a seeded random.Random; never the module functions


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_imports_io_or_clocks() -> None:
    files = sorted(PACKAGE.glob("*.py"))
    assert len(files) >= 9
    for path in files:
        imports = imported_modules(path)
        assert not imports & FORBIDDEN, f"{path.name} imports {imports & FORBIDDEN}"
        if "random" in imports:
            assert path.name in ALLOWED_RANDOM, path.name
            assert module_random_calls(path) == [], path.name


def module_random_calls(path: pathlib.Path) -> list[str]:
    """Uses of `random.<anything but Random>`: the global generator."""
    return [
        node.attr
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id == "random" and node.attr != "Random"
    ]


def test_modules_stay_small_and_documented() -> None:
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path.name} lacks a module docstring"
        assert len(path.read_text().splitlines()) < 500, path.name
        assert "assert " not in path.read_text(), f"{path.name} validates with assert"


def test_importing_protocol_loads_no_io_packages() -> None:
    code = "import sys, protocol; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout.split())
    assert not loaded & {"trio", "torch", "logging", "socket", "asyncio"}
