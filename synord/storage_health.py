"""The node's storage health: the one place that knows whether this node can write.

Fed by every write path's failure (``failed(where, exc)``: a full disk, a
read-only or failing one) and by a free-space check (``check()``, every
second). Read by the market (no asks, proposals refused while unhealthy), the
control API (507 instead of a traceback), ``status`` and ``doctor``.

It recovers by itself: once free space is back above the floor and a probe
write to the store commits, the condition clears and the asks come back.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("synord.storage")

# errno values that mean "the disk will not take this write", not a bug of ours.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}
# SQLite result codes with the same meaning (Python >= 3.11 names them).
_SQLITE_DISK = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CORRUPT", "SQLITE_NOTADB")


FILL_RATE = 512 * 2**20  # bytes/s: a fast local disk filling up, for next_check_s


def storage_error(exc: BaseException) -> str | None:
    """A short reason when ``exc`` is the disk (or the store on it) failing us, else None."""
    while exc is not None:
        if isinstance(exc, sqlite3.Error):
            name = getattr(exc, "sqlite_errorname", "") or ""
            if name.startswith(_SQLITE_DISK) or "disk is full" in str(exc):
                return f"state store: {exc}"
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
            return os.strerror(exc.errno)
        exc = exc.__cause__
    return None


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class StorageHealth:
    def __init__(self, path: Path, min_free_bytes: int, probe: Callable[[], None] | None = None,
                 on_change: Callable[[bool], None] | None = None):
        self.path = Path(path)
        self.min_free_bytes = min_free_bytes
        self.probe = probe  # a tiny durable write: proves the disk takes writes again
        self.on_change = on_change
        self.failure: tuple[str, str] | None = None  # (where, why) of the last failed write
        self.since: float | None = None
        self.free_bytes: int | None = None
        self.low = False
        self.notes: list[str] = []  # facts found at start worth saying (an empty store)

    @property
    def ok(self) -> bool:
        return self.failure is None and not self.low

    @property
    def reason(self) -> str | None:
        if self.failure is not None:
            where, why = self.failure
            return f"disk full or failing ({where}: {why})"
        if self.low:
            return (f"only {fmt_bytes(self.free_bytes or 0)} free on {self.path} "
                    f"(storage.min_free_bytes is {fmt_bytes(self.min_free_bytes)})")
        return None

    def failed(self, where: str, exc: BaseException) -> str | None:
        """Record a write that failed; returns the condition's reason when ``exc`` is a
        storage error (the caller keeps its data and retries), None otherwise."""
        why = storage_error(exc)
        if why is None:
            return None
        was_ok = self.ok
        self.failure = (where, why)
        self._transition(was_ok)
        return self.reason

    def check(self) -> bool:
        """Measure free space; clear a past failure once there is room and a probe commits."""
        was_ok = self.ok
        try:
            st = os.statvfs(self.path)
            self.free_bytes = st.f_bavail * st.f_frsize
        except OSError as exc:
            self.failure = ("free-space check", str(exc))
            self._transition(was_ok)
            return self.ok
        self.low = self.free_bytes < self.min_free_bytes
        if self.failure is not None and not self.low:
            try:
                if self.probe is not None:
                    self.probe()
            except Exception as exc:  # still failing, whatever the reason: keep saying so
                self.failure = ("probe write", storage_error(exc) or f"{type(exc).__name__}: {exc}")
            else:
                self.failure = None
        self._transition(was_ok)
        return self.ok

    def next_check_s(self, fastest: float = 1.0, slowest: float = 10.0) -> float:
        """When to look again: soon while failing or near the floor, rarely with room to
        spare (the time the headroom lasts at FILL_RATE; write paths report failures
        at once anyway), so an idle node does not statvfs every second."""
        if not self.ok or self.free_bytes is None:
            return fastest
        headroom = self.free_bytes - self.min_free_bytes
        return max(fastest, min(slowest, headroom / FILL_RATE))

    def _transition(self, was_ok: bool) -> None:
        if was_ok == self.ok:
            return
        if self.ok:
            log.warning("storage healthy again: taking work again",
                        extra={"free_bytes": self.free_bytes})
            self.since = None
        else:
            log.error("storage unhealthy: no new work until it recovers", extra={"reason": self.reason})
            self.since = time.time()
        if self.on_change is not None:
            self.on_change(self.ok)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "reason": self.reason, "free_bytes": self.free_bytes,
                "min_free_bytes": self.min_free_bytes, "since": self.since, "notes": list(self.notes)}
