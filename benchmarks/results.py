"""benchmarks/RESULTS.md: each script that records its figures owns one `## ` section of it."""

from __future__ import annotations

import pathlib

RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS.md"


def write_section(section: str, path: pathlib.Path = RESULTS) -> None:
    """Replace (or append) the section whose heading is `section`'s first line, leaving the others alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    heading = section.splitlines()[0]
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        rest = "" if end < 0 else text[end + 1 :]
        text = text[:start] + section + ("\n" + rest if rest else "")
    path.write_text(text)
