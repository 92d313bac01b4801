"""Checkpoints as single content-addressed files: a deterministic tar of the
runtime's checkpoint directory, named by its sha256 so it can travel through
the blob transfer protocol and be verified on arrival."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from pathlib import Path


class CheckpointError(Exception):
    pass


class _HashingWriter:
    """A file that hashes what is written to it: the tar's sha256 without reading it back."""

    def __init__(self, f):
        self.f, self.h, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.h.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


def pack(directory: Path, dest_tar: Path) -> tuple[str, int]:
    """Tar ``directory`` (sorted names, zeroed times/owners); returns (sha256, size)."""
    directory = Path(directory)
    tmp = dest_tar.with_name(dest_tar.name + ".tmp")
    with open(tmp, "wb") as raw, tarfile.open(fileobj=(out := _HashingWriter(raw)), mode="w",
                                              format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(directory.rglob("*")):
            if p.is_symlink() or not (p.is_file() or p.is_dir()):
                continue  # checkpoints are plain files and directories
            info = tar.gettarinfo(str(p), arcname=p.relative_to(directory).as_posix())
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if p.is_file():
                with open(p, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    os.replace(tmp, dest_tar)
    return out.h.hexdigest(), out.size


class _HashingReader:
    """A file read front to back that hashes what was read."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        return data


def unpack(tar_path: Path, dest: Path, expected_sha: str | None = None) -> Path:
    """Verify and extract a checkpoint tar; refuses anything but plain files and dirs.

    One pass over the file: members are checked and extracted as the tar is read
    and hashed, and a digest mismatch at the end raises (the caller discards
    ``dest``), so a 64 MiB checkpoint is read once, not twice."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with open(tar_path, "rb") as raw:
            src = _HashingReader(raw)
            with tarfile.open(fileobj=src, mode="r|") as tar:
                for m in tar:
                    name = Path(m.name)
                    if name.is_absolute() or ".." in name.parts or not (m.isfile() or m.isdir()):
                        raise CheckpointError(f"checkpoint entry {m.name!r} is not allowed")
                    tar.extract(m, dest, filter="data")
            while src.read(1 << 20):
                pass  # the tar's end padding counts in its digest
    except tarfile.TarError as exc:
        raise CheckpointError(f"checkpoint {tar_path.name} is not a valid archive: {exc}") from None
    if expected_sha is not None and src.h.hexdigest() != expected_sha:
        raise CheckpointError(f"checkpoint {tar_path.name}: sha256 mismatch")
    return dest


def restore_source(blob: Path, dest: Path, sha: str, archive: bool) -> Path:
    """What the runtime restores from, given the checkpoint blob ``sha``.

    ``archive`` (a runtime that reads the tar itself, CheckpointInfo.archive):
    the blob as it is, not unpacked nor hashed again: the blob store verified
    every byte against ``sha`` on arrival and stores nothing else under that
    name. It is hard-linked to ``dest``.tar so the cache cannot evict it under
    the task. Otherwise the blob is unpacked into ``dest``, verified once more."""
    if not archive:
        return unpack(blob, dest, expected_sha=sha)
    out = dest.with_name(dest.name + ".tar")
    try:
        os.link(blob, out)
    except OSError:  # another filesystem
        shutil.copyfile(blob, out)
    return out
