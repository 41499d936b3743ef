"""How the long-running commands (`hearth node`, `hearth api`) report: one line per event, as
text for people (`--log-format text`, the default) or one JSON object per line for machines
(`--log-format json`: `time`, `level`, `logger`, `message`, and `exception` with its traceback).

Two streams: log records go to stderr (INFO and up with -v, else warnings and errors); the
milestones a supervisor waits for (`listening on ...`, `api listening on ...`, `stopped`) go to
stdout through `say`, in the same format. Neither ever carries a prompt or generated text: the
code logs token counts, ids of requests and peers, never the text.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

_format = "text"


def add_log_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="text (default), or json: one JSON object per line, on stdout and stderr")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each session and request (INFO)")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback is a field, its newlines escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        event = {"time": _timestamp(record.created), "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, ensure_ascii=False)


def setup_logging(verbose: bool, log_format: str = "text") -> None:
    """Log records to stderr, one line each, in `log_format`; `say` follows the same format."""
    global _format
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    _format = log_format
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)


def say(text: str, logger: str = "hearth.node") -> None:
    """A milestone on stdout: the text itself, or (json) an event whose message it is."""
    if _format == "json":
        text = json.dumps({"time": _timestamp(time.time()), "level": "info", "logger": logger, "message": text},
                          ensure_ascii=False)
    print(text, flush=True)


def _timestamp(seconds: float) -> str:
    """ISO 8601 in UTC with milliseconds: 2026-12-03T04:05:06.789Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"
