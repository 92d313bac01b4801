"""A deterministic writer of "newc" cpio archives, the format the Linux
kernel unpacks as an initramfs.

Deterministic (sorted names, mtime 0, uid/gid 0, fresh inode numbers) so the
same rootfs always gives the same bytes: a microVM checkpoint can name the
initramfs it needs by digest.  Hard links are stored as independent copies,
which the kernel accepts; sockets and FIFOs are skipped.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

_TRAILER = "TRAILER!!!"


class CpioWriter:
    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1 << 20  # away from the inode numbers of a base archive

    def _header(self, name: str, mode: int, size: int, nlink: int = 1,
                rdev_major: int = 0, rdev_minor: int = 0) -> None:
        raw = name.encode("utf-8", "surrogateescape") + b"\0"
        self._ino += 1
        fields = [self._ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev_major, rdev_minor,
                  len(raw), 0]
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(hdr + raw + b"\0" * (-(len(hdr) + len(raw)) % 4))

    def add_bytes(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._header(name, stat.S_IFREG | mode, len(data))
        self._out.write(data + b"\0" * (-len(data) % 4))

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        self._header(name, stat.S_IFDIR | mode, 0, nlink=2)

    def add_tree(self, root: Path, prefix: str) -> None:
        """Everything under ``root`` (not root itself) as ``prefix/...``."""
        root = Path(root)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            base = prefix if rel == "." else f"{prefix}/{rel}"
            for name in sorted(dirnames + filenames):
                self.add_path(Path(dirpath, name), f"{base}/{name}")

    def add_path(self, path: Path, name: str) -> None:
        st = os.lstat(path)
        perm = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            self.add_dir(name, perm)
        elif stat.S_ISLNK(st.st_mode):
            target = os.readlink(path).encode("utf-8", "surrogateescape")
            self._header(name, st.st_mode, len(target))
            self._out.write(target + b"\0" * (-len(target) % 4))
        elif stat.S_ISREG(st.st_mode):
            self._header(name, st.st_mode, st.st_size)
            with open(path, "rb") as f:
                written = 0
                while block := f.read(1 << 20):
                    self._out.write(block)
                    written += len(block)
            if written != st.st_size:
                raise OSError(f"{path} changed size while being archived")
            self._out.write(b"\0" * (-written % 4))
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            self._header(name, st.st_mode, 0, rdev_major=os.major(st.st_rdev),
                         rdev_minor=os.minor(st.st_rdev))
        # sockets and FIFOs have no place in an image

    def close(self) -> None:
        self._header(_TRAILER, 0, 0, nlink=1)
        self._out.flush()
