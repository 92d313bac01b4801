"""The artefact and checkpoint blobs a node keeps (home/artifacts), bounded.

``storage.cache_max_bytes`` caps the directory; past it, or when an incoming
blob would not fit on the disk above ``storage.min_free_bytes``, the least
recently used blobs go first. Never evicted: a blob a running task uses (its
artefact, the checkpoint it restored from), one a job of ours still needs to
ship (its artefact, a checkpoint not yet superseded), one being uploaded, and
one received for an agreement whose task has not started yet — the owners say
which through ``pinned()``.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Callable

from synord.protocols.transfer import BlobStore

from .storage_health import fmt_bytes

log = logging.getLogger("synord.blobcache")

_BLOB = re.compile(r"^\.?([0-9a-f]{64})")


class BlobCache:
    def __init__(self, blobs: BlobStore, max_bytes: int, pinned: Callable[[], set[str]]):
        self.blobs = blobs
        self.max_bytes = max_bytes
        self.pinned = pinned
        self._used: dict[str, float] = {}  # sha -> last use (monotonic across a run: wall clock)
        self.evicted = 0

    def touch(self, sha: str) -> None:
        self._used[sha] = time.time()

    def _entries(self) -> list[tuple[float, int, Path, str]]:
        """(last use, size, path, sha) of every file in the directory, blobs and partials."""
        out = []
        try:
            names = os.listdir(self.blobs.dir)
        except FileNotFoundError:
            return []
        for name in names:
            m = _BLOB.match(name)
            if not m:
                continue
            p = self.blobs.dir / name
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append((self._used.get(m.group(1), st.st_mtime), st.st_size, p, m.group(1)))
        return out

    def used_bytes(self) -> int:
        return sum(e[1] for e in self._entries())

    def make_room(self, need: int = 0, free_bytes: int | None = None, min_free: int = 0) -> str | None:
        """Evict until ``need`` more bytes fit under the limit and on the disk; the reason when
        even evicting everything unpinned would not do."""
        if need > self.max_bytes:
            return f"a blob of {fmt_bytes(need)} is over this node's cache limit of {fmt_bytes(self.max_bytes)}"
        entries = sorted(self._entries(), key=lambda e: e[0])
        used = sum(e[1] for e in entries)
        pinned = self.pinned() | {sha for sha, lock in self.blobs._locks.items() if lock.locked()}
        evictable = sum(e[1] for e in entries if e[3] not in pinned)

        def fits(freed: int) -> bool:
            disk_ok = free_bytes is None or free_bytes + freed - need >= min_free
            return used - freed + need <= self.max_bytes and disk_ok

        if need and not fits(evictable):  # hopeless: evict nothing for it
            return self._why_not(need, used, free_bytes, min_free, evictable)
        freed = 0
        for _last, size, path, sha in entries:
            if fits(freed):
                break
            if sha in pinned:
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            freed += size
            self.evicted += 1
            self._used.pop(sha, None)
            log.info("blob evicted", extra={"sha256": sha[:16], "bytes": size})
        return None if fits(freed) else self._why_not(need, used, free_bytes, min_free, freed)

    def _why_not(self, need: int, used: int, free_bytes: int | None, min_free: int, freed: int) -> str:
        if free_bytes is not None and free_bytes + freed - need < min_free:
            return (f"{fmt_bytes(need)} would not fit on the disk: {fmt_bytes(max(0, free_bytes + freed))} "
                    f"free at most, {fmt_bytes(min_free)} kept free")
        return (f"{fmt_bytes(need)} would not fit in the cache limit of {fmt_bytes(self.max_bytes)}: "
                f"{fmt_bytes(used - freed)} in use by running tasks")
