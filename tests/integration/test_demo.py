"""`hearth demo`, the main job, end to end: real processes, text out, nothing left running."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from node.demo import DEMO_MODEL


def demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", "demo", "--max-new-tokens", "12", *args],
                          capture_output=True, text=True, timeout=240)


def node_pids(stderr: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"\(pid (\d+)\) serves", stderr)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_bundled_model_is_small_and_has_a_manifest():
    files = {p.name: p.stat().st_size for p in DEMO_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "hearth-manifest.json"} <= set(files)
    assert sum(files.values()) <= 20 * 2**20


def test_demo_generates_text_and_leaves_no_process_behind():
    done = demo()
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("def fibonacci(n):") and len(done.stdout.strip()) > len("def fibonacci(n):")
    for expected in ("starting 3 node processes", "route:", "tokens/s", "hop "):
        assert expected in done.stderr
    pids = node_pids(done.stderr)
    assert len(pids) == 3 and not any(alive(pid) for pid in pids)


def test_kill_one_gives_the_same_text_and_shows_the_failover():
    plain, killed = demo("--prompt", "import os"), demo("--prompt", "import os", "--kill-one")
    assert plain.returncode == 0 and killed.returncode == 0, killed.stderr
    assert killed.stdout == plain.stdout
    assert "killed node" in killed.stderr and "recovered from" in killed.stderr
    assert not any(alive(pid) for pid in node_pids(killed.stderr))
