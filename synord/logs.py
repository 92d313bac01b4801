"""Structured logging to stderr: logfmt lines, journald priority prefixes under systemd."""

from __future__ import annotations

import logging
import os
import sys
import time

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _quote(value: object) -> str:
    s = str(value)
    if s == "" or any(c in s for c in ' ="\n'):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


class LogfmtFormatter(logging.Formatter):
    def __init__(self, journald: bool):
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if not self.journald:  # journald stamps lines itself
            parts.append("ts=" + time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                         + f".{int(record.msecs):03d}Z")
        parts += [f"level={record.levelname.lower()}", f"logger={record.name}",
                  f"msg={_quote(record.getMessage())}"]
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            parts.append("exc=" + _quote(self.formatException(record.exc_info)))
        line = " ".join(parts)
        return f"<{_PRIORITY.get(record.levelno, 6)}>{line}" if self.journald else line


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(journald=bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # py-libp2p and friends are chatty at INFO; keep them to warnings.
    for noisy in ("libp2p", "multiaddr", "hypercorn", "zeroconf", "async_service"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
