"""Artefact checks a consumer runs before anything is reserved, and the one-file
form an artefact travels in.

A task whose artefact is not what it claims (not WebAssembly, an image whose
blobs don't match their digests) is refused at submission with the reason,
not after a provider reserved capacity and downloaded it.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

from .base import SpecError

WASM_MAGIC = b"\0asm"
# Caps on what a task may ship: a module is read whole into memory; an image
# travels as one blob (synord.protocols.transfer.MAX_BLOB_BYTES is the wire's limit).
MAX_WASM_BYTES = 256 << 20
MAX_IMAGE_BYTES = 16 << 30


def open_regular(path: Path, max_bytes: int = MAX_IMAGE_BYTES) -> BinaryIO:
    """Open an artefact for reading only if it is a regular file of at most ``max_bytes``.

    O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer;
    fstat on the opened descriptor (not the name) then refuses FIFOs, devices
    (/dev/zero) and sockets, wherever a symlink pointed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise SpecError(f"cannot read artefact {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        what = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                or stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file")
        raise SpecError(f"artefact {path} is {what}, not a regular file")
    if st.st_size > max_bytes:
        os.close(fd)
        raise SpecError(f"artefact {path} is {st.st_size} bytes, over the limit of {max_bytes}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def infer_kind(artifact: Path) -> str:
    """The sandbox kind an artefact asks for: .wasm (or wasm magic) -> wasm, OCI image -> container."""
    artifact = Path(artifact)
    if artifact.is_dir():
        if (artifact / "oci-layout").exists():
            return "container"
        raise SpecError(f"{artifact}: a directory but not an OCI image layout (no oci-layout file)")
    with open_regular(artifact) as f:  # no FIFO or device: they would hang or never end
        head = f.read(512)
    if head.startswith(b"\0asm") or artifact.suffix == ".wasm":
        return "wasm"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "container"  # an oci-archive tarball
    raise SpecError(f"{artifact}: neither a WebAssembly module nor an OCI image "
                    "(layout directory or oci-archive tarball)")


def check_artifact(kind: str, path: Path) -> None:
    path = Path(path)
    if not path.exists():
        raise SpecError(f"artefact {path} does not exist")
    if not path.is_dir():
        open_regular(path, MAX_WASM_BYTES if kind == "wasm" else MAX_IMAGE_BYTES).close()
    if kind == "wasm":
        _check_wasm(path)
    elif kind in ("container", "microvm"):
        _check_image(path)
    else:
        raise SpecError(f"unknown runtime {kind!r}")


def _check_wasm(path: Path) -> None:
    if path.is_dir():
        raise SpecError(f"{path}: a directory, not a WebAssembly module")
    with open_regular(path, MAX_WASM_BYTES) as f:
        data = f.read(MAX_WASM_BYTES + 1)
    if len(data) > MAX_WASM_BYTES:
        raise SpecError(f"{path.name}: over the limit of {MAX_WASM_BYTES} bytes")
    if not data.startswith(WASM_MAGIC):
        raise SpecError(f"{path.name}: not a WebAssembly module (bad magic bytes)")
    try:
        import wasmtime
    except ImportError:
        return  # the provider validates it again before running it
    try:
        wasmtime.Module.validate(wasmtime.Engine(), data)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"{path.name}: invalid WebAssembly module: {first}") from None


def _check_image(path: Path) -> None:
    from . import oci
    oci.check_image(path)  # what providers accept too: index → manifest → config → layers, digests


def ship_form(kind: str, path: Path, scratch: Path) -> Path:
    """The single file that carries ``path`` over the wire (an image dir → oci-archive)."""
    path = Path(path)
    if path.is_dir():
        from .oci_build import pack_oci_archive
        Path(scratch).mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".ship-", suffix=".tar", dir=scratch)
        import os
        os.close(fd)
        pack_oci_archive(path, Path(tmp))
        return Path(tmp)
    return path
