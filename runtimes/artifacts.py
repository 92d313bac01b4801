"""Artefact checks a consumer runs before anything is reserved, and the one-file
form an artefact travels in.

A task whose artefact is not what it claims (not WebAssembly, an image whose
blobs don't match their digests) is refused at submission with the reason,
not after a provider reserved capacity and downloaded it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .base import SpecError

WASM_MAGIC = b"\0asm"


def check_artifact(kind: str, path: Path) -> None:
    path = Path(path)
    if not path.exists():
        raise SpecError(f"artefact {path} does not exist")
    if kind == "wasm":
        _check_wasm(path)
    elif kind in ("container", "microvm"):
        _check_image(path)
    else:
        raise SpecError(f"unknown runtime {kind!r}")


def _check_wasm(path: Path) -> None:
    if path.is_dir():
        raise SpecError(f"{path}: a directory, not a WebAssembly module")
    data = path.read_bytes()
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
        from .oci import pack_oci_archive
        Path(scratch).mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".ship-", suffix=".tar", dir=scratch)
        import os
        os.close(fd)
        pack_oci_archive(path, Path(tmp))
        return Path(tmp)
    return path
