"""Content digests: an artefact checked against the sha256 it was agreed by, and
one digest over a checkpoint directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .base import SpecError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def expect_digest(name: str, actual: str, expected: str | None) -> None:
    """SpecError unless ``actual`` (hex) is the ``expected`` digest (hex or "sha256:hex"; None: any)."""
    if expected is not None and actual != expected.removeprefix("sha256:"):
        raise SpecError(f"artefact {name}: sha256 mismatch (expected {expected}, got {actual})")


def verify_artifact(path: Path, expected: str | None) -> None:
    """Raise SpecError unless the artefact exists and matches its digest."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"artefact {path} does not exist")
    if expected is None or path.is_dir():
        return
    expect_digest(path.name, sha256_file(path), expected)


def checkpoint_digest(directory: Path) -> tuple[int, str]:
    """(total bytes, sha256) over every file of a checkpoint directory, by sorted name."""
    h = hashlib.sha256()
    total = 0
    for p in sorted(Path(directory).rglob("*")):
        if p.is_file():
            rel = p.relative_to(directory).as_posix().encode()
            h.update(len(rel).to_bytes(4, "big") + rel)
            with open(p, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
                    total += len(block)
    return total, h.hexdigest()
