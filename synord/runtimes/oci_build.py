"""Building OCI images of our own: a busybox-static rootfs plus files, for tests,
the demo and the microVM guest, and the ``oci-archive`` tarball a consumer ships.

Outputs are byte-for-byte reproducible (sorted entries, mtime 0, fixed gzip
header), so the same inputs always give the same content address. Reading and
unpacking images from others is `synord.runtimes.oci`, which trusts nothing.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import Iterator

from .base import SpecError
from .digests import sha256_file
from .oci import MT_CONFIG, MT_INDEX, MT_LAYER_GZIP, MT_LAYER_TAR, MT_MANIFEST, REF_ANNOTATION, _canon, _sha

BUSYBOX_PATHS = (Path("/bin/busybox"), Path("/usr/bin/busybox"))


def _tarinfo(name: str, type_: bytes, mode: int, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.size, ti.linkname = type_, mode, size, linkname
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "", ""
    return ti


def busybox_binary() -> Path:
    for p in BUSYBOX_PATHS:
        if p.is_file():
            return p
    raise SpecError("busybox-static is not installed (apt-get install busybox-static)")


def _busybox_applets(bb: Path) -> list[str]:
    import subprocess
    out = subprocess.run([str(bb), "--list"], capture_output=True, text=True, check=True).stdout
    return sorted({a.strip() for a in out.split() if a.strip() and "/" not in a and a != "busybox"})


def _layer_tar(entries: list[tarfile.TarInfo], contents: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ti in sorted(entries, key=lambda t: t.name):
            data = contents.get(ti.name)
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    # mtime=0 and no filename: the gzip header carries nothing time-dependent.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
        gz.write(data)
    return buf.getvalue()


def build_image(dest: Path, layers: list[bytes], *, tag: str = "latest",
                entrypoint: list[str] | None = None, cmd: list[str] | None = None,
                env: list[str] | None = None, workdir: str = "/", compress: bool = True) -> str:
    """Write an OCI layout at ``dest`` from uncompressed layer tars; returns the manifest digest."""
    dest = Path(dest)
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        d = _sha(data)
        p = blobs / d.split(":", 1)[1]
        if not p.exists():
            tmp = p.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.rename(p)
        return d

    layer_descs, diff_ids = [], []
    for raw in layers:
        diff_ids.append(_sha(raw))
        blob = _gzip(raw) if compress else raw
        layer_descs.append({"mediaType": MT_LAYER_GZIP if compress else MT_LAYER_TAR,
                            "digest": put(blob), "size": len(blob)})
    config = {"architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
              "config": {"Entrypoint": entrypoint, "Cmd": cmd,
                         "Env": env if env is not None else
                         ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                         "WorkingDir": workdir},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    cblob = _canon(config)
    manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST,
                "config": {"mediaType": MT_CONFIG, "digest": put(cblob), "size": len(cblob)},
                "layers": layer_descs}
    mblob = _canon(manifest)
    mdigest = put(mblob)
    index = {"schemaVersion": 2, "mediaType": MT_INDEX,
             "manifests": [{"mediaType": MT_MANIFEST, "digest": mdigest, "size": len(mblob),
                            "annotations": {REF_ANNOTATION: tag}}]}
    (dest / "index.json").write_bytes(_canon(index))
    (dest / "oci-layout").write_bytes(_canon({"imageLayoutVersion": "1.0.0"}))
    return mdigest


def busybox_layer(files: dict[str, bytes | str] | None = None) -> bytes:
    """Uncompressed tar of a busybox-static rootfs plus ``files`` (path -> content; mode 0755)."""
    bb = busybox_binary()
    data = bb.read_bytes()
    entries: list[tarfile.TarInfo] = []
    contents: dict[str, bytes] = {}
    dirs = {"bin", "dev", "etc", "proc", "sys", "tmp", "root", "usr", "usr/bin", "var", "work"}
    for d in dirs:
        entries.append(_tarinfo(d, tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755))
    entries.append(_tarinfo("bin/busybox", tarfile.REGTYPE, 0o755, len(data)))
    contents["bin/busybox"] = data
    for applet in _busybox_applets(bb):
        entries.append(_tarinfo(f"bin/{applet}", tarfile.SYMTYPE, 0o777, linkname="busybox"))
    etc = {"etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
           "etc/group": b"root:x:0:\nnogroup:x:65534:\n"}
    for name, content in list(etc.items()) + [(k.lstrip("/"), v.encode() if isinstance(v, str) else v)
                                                for k, v in (files or {}).items()]:
        parts = PurePosixPath(name).parts
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                entries.append(_tarinfo(d, tarfile.DIRTYPE, 0o755))
        entries = [e for e in entries if e.name != name]
        entries.append(_tarinfo(name, tarfile.REGTYPE, 0o755 if name not in etc else 0o644, len(content)))
        contents[name] = content
    return _layer_tar(entries, contents)


def build_busybox_image(dest: Path, tag: str = "latest", files: dict[str, bytes | str] | None = None,
                        entrypoint: list[str] | None = None, cmd: list[str] | None = None,
                        env: list[str] | None = None) -> str:
    """A minimal reproducible OCI layout with busybox-static; returns the manifest digest.

    ``files`` adds/overrides paths (e.g. {"/work/run.sh": "#!/bin/sh\\n..."}, mode 0755).
    Default command: ``/bin/sh``."""
    return build_image(dest, [busybox_layer(files)], tag=tag, entrypoint=entrypoint,
                       cmd=cmd if cmd is not None else (None if entrypoint else ["/bin/sh"]), env=env)


def pack_oci_archive(layout_dir: Path, tar_path: Path) -> str:
    """Tar a layout dir reproducibly (the ``oci-archive`` format); returns the tar's sha256 hex."""
    layout_dir, tar_path = Path(layout_dir), Path(tar_path)
    tmp = tar_path.with_name(tar_path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(_walk(layout_dir)):
            rel = p.relative_to(layout_dir).as_posix()
            if p.is_dir():
                tar.addfile(_tarinfo(rel, tarfile.DIRTYPE, 0o755))
            else:
                size = p.stat().st_size
                with open(p, "rb") as f:
                    tar.addfile(_tarinfo(rel, tarfile.REGTYPE, 0o644, size), f)
    tmp.rename(tar_path)
    return sha256_file(tar_path)


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            if not p.is_symlink():
                yield p
