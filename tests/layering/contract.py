"""The layering contract, checked by reading source (no import runs): who may import whom.

Packages are layered `simulations -> node -> mesh -> shard -> protocol`: each imports only the
packages after it, never one before it. Besides, each package keeps out of what its layer must not
do (`FORBIDDEN`): protocol/ no I/O, clocks, logging or torch (sans-IO); shard/ no trio and no
networking; mesh/, node/ and simulations/ no torch (they hold numpy arrays through
`shard.interfaces`). Within a package, modules import each other without cycles. Every import
counts: at the top of a module, inside a function, or under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LAYERS = ("simulations", "node", "mesh", "shard", "protocol")  # each may import those after it
NETWORKING = frozenset({"trio", "libp2p", "multiaddr", "socket", "asyncio", "ssl", "http", "urllib", "selectors"})
FORBIDDEN: dict[str, frozenset[str]] = {
    "protocol": frozenset({"trio", "torch", "time", "logging", "socket", "asyncio", "threading", "os", "libp2p"}),
    "shard": NETWORKING,
    "mesh": frozenset({"torch", "safetensors", "transformers"}),
    "node": frozenset({"torch", "safetensors", "transformers"}),
    "simulations": frozenset({"torch", "safetensors", "transformers"}),
}


@dataclass(frozen=True)
class Violation:
    module: str  # dotted name of the importing module
    imported: str  # dotted name it imports
    line: int
    rule: str  # why it is not allowed

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.imported}: {self.rule}"


def imports(path: Path) -> Iterator[tuple[str, int]]:
    """(dotted module name, line) of every import in the file, wherever it appears."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno
            for alias in node.names:  # `from shard import span` imports the module shard.span
                yield f"{node.module}.{alias.name}", node.lineno


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file of every module of `package` under `root`."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def check(root: Path) -> list[Violation]:
    """Every breach of the contract by the packages under `root`."""
    violations: list[Violation] = []
    for package in LAYERS:
        known = modules(root, package)
        graph: dict[str, set[str]] = {name: set() for name in known}
        for name, path in known.items():
            for imported, line in imports(path):
                top = imported.split(".")[0]
                if top in LAYERS and LAYERS.index(top) < LAYERS.index(package):
                    violations.append(Violation(name, imported, line, f"{package} is below {top} in "
                                                f"{' -> '.join(LAYERS)}"))
                elif top in FORBIDDEN[package]:
                    violations.append(Violation(name, imported, line, f"{package} must not use {top}"))
                elif top == "tests":
                    violations.append(Violation(name, imported, line, "shipped code must not import tests"))
                if imported in known and imported != name and not name.startswith(imported + "."):
                    graph[name].add(imported)
        violations.extend(_cycles(graph, known))
    return violations


def _cycles(graph: dict[str, set[str]], known: dict[str, Path]) -> list[Violation]:
    """One violation per import cycle among a package's modules (depth-first search)."""
    found, state, stack = [], {}, []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                loop = stack[stack.index(target):] + [target]
                found.append(Violation(name, target, 0, "import cycle " + " -> ".join(loop)))
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    return found
