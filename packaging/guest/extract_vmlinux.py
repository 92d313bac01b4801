#!/usr/bin/env python3
"""Extract the uncompressed ELF vmlinux from a bzImage.

Same idea as the kernel's scripts/extract-vmlinux, written from scratch: look
for the magic bytes of each compressor the kernel supports, try to
decompress from every match, keep the first result that is an ELF file.
An uncompressed vmlinux boots ~2.7x faster under TCG (no in-guest
decompression).  Usage: extract_vmlinux.py BZIMAGE OUT
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import subprocess
import sys
import zlib

MAGICS = [
    ("gzip", b"\x1f\x8b\x08"),
    ("xz", b"\xfd7zXZ\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00\x00"),
]


def _decompress(kind: str, data: bytes) -> bytes | None:
    try:
        if kind == "gzip":
            # trailing bytes after the stream are normal in a bzImage
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
        if kind == "xz":
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
        if kind == "lzma":
            return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)
        if kind == "bzip2":
            return bz2.BZ2Decompressor().decompress(data)
        if kind == "zstd":
            if not shutil.which("zstd"):
                return None
            r = subprocess.run(["zstd", "-dcq"], input=data, capture_output=True)
            return r.stdout or None
    except (lzma.LZMAError, OSError, EOFError, zlib.error, ValueError):
        return None
    return None


def extract(image: bytes) -> bytes:
    if image[:4] == b"\x7fELF":
        return image
    for kind, magic in MAGICS:
        start = 0
        while (pos := image.find(magic, start)) != -1:
            out = _decompress(kind, image[pos:])
            if out and out[:4] == b"\x7fELF":
                return out
            start = pos + 1
    raise SystemExit("no compressed ELF kernel found in the image")


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.strip().splitlines()[-1])
    with open(sys.argv[1], "rb") as f:
        data = f.read()
    out = extract(data)
    tmp = sys.argv[2] + ".tmp"
    with open(tmp, "wb") as f:
        f.write(out)
    import os
    os.replace(tmp, sys.argv[2])


if __name__ == "__main__":
    main()
