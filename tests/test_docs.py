"""docs/design.md names real code: every backticked dotted name of ours in it resolves.

A name such as `mesh.client.Client.generate` resolves when its longest importable prefix
(`mesh.client`) imports and the rest (`Client`, then `generate`) is found by getattr, one part
after another. The map is only worth reading while it lands on the functions it names.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"
PACKAGES = ("protocol", "shard", "mesh", "node", "simulations")
# A backticked span that starts with one of our packages and a dot: the dotted name at its start
# (a call's arguments after it, as in `plan_route(...)`, are not part of the name).
NAME = re.compile(r"`((?:" + "|".join(PACKAGES) + r")\.[\w.]*)[^`]*`")


def dotted_names(text: str) -> list[str]:
    """The dotted names of ours in backticks in `text`, in order, each once."""
    return list(dict.fromkeys(NAME.findall(text)))


def resolve(name: str) -> object:
    """The object `name` names; LookupError saying which part is missing."""
    parts = name.split(".")
    if not all(part.isidentifier() for part in parts):
        raise LookupError(f"{name!r} is not a dotted Python name")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            found = importlib.import_module(module_name)
            break
        except ModuleNotFoundError as err:
            if err.name is None or not module_name.startswith(err.name):
                raise  # the module exists but imports something missing: not the doc's fault
    else:
        raise LookupError(f"no module of {name!r} imports")
    for depth, part in enumerate(parts[cut:], start=cut):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise LookupError(f"{'.'.join(parts[:depth])} has no {part!r} (in {name!r})") from None
    return found


def test_every_dotted_name_in_the_design_resolves():
    names = dotted_names(DESIGN.read_text())
    assert len(names) >= 30, f"expected the tour's names, found {names}"
    missing = []
    for name in names:
        try:
            resolve(name)
        except LookupError as err:
            missing.append(str(err))
    assert not missing, "docs/design.md names code that does not exist:\n" + "\n".join(missing)


def test_a_wrong_name_fails():
    text = ("The client calls `mesh.client.Client.generate`, then `mesh.routing.plan_route(servers, 0, n)`, "
            "`mesh.client.Client.no_such_method`, `shard.nowhere.Thing` and `mesh.libp2p.*`; "
            "`trio.sleep` and `node/` are not ours.")
    assert dotted_names(text) == ["mesh.client.Client.generate", "mesh.routing.plan_route",
                                  "mesh.client.Client.no_such_method", "shard.nowhere.Thing", "mesh.libp2p."]
    assert callable(resolve("mesh.client.Client.generate"))
    assert callable(resolve("mesh.routing.plan_route"))
    with pytest.raises(LookupError, match="mesh.client.Client has no 'no_such_method'"):
        resolve("mesh.client.Client.no_such_method")
    with pytest.raises(LookupError, match="shard has no 'nowhere'"):
        resolve("shard.nowhere.Thing")
    with pytest.raises(LookupError, match="not a dotted Python name"):
        resolve("mesh.libp2p.")
