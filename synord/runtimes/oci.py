"""OCI images on disk, as they come from others: verify, unpack, export.

An image comes as an OCI image layout directory (``oci-layout``, ``index.json``,
``blobs/sha256/…``) or as an ``oci-archive`` tarball of such a directory.
`unpack_image` trusts nothing in it:

- every blob it reads (manifest, config, layers) is hashed and compared with
  the digest and size that referenced it; the uncompressed layer stream is
  also checked against the config's ``rootfs.diff_ids``;
- layer entries are applied in order with OCI whiteouts (``.wh.NAME`` and
  ``.wh..wh..opq``), and refused (`SpecError`) when they are absolute, contain
  ``..``, are device nodes, or would be written through a symlink whose ``..``
  climbs above the rootfs. Other symlinks on the way are followed the way the
  container sees them: absolute targets resolve against the rootfs, never the
  host (so ``var/run -> /run`` works and ``x -> /etc`` cannot reach host /etc).

What is accepted is decided once, here (`check_image`): the consumer's
pre-check at submission and the provider before it takes a task both call it,
and the unpacker reads with the same table (`LAYER_TYPES`: tar, gzip, zstd).
Inputs: an OCI layout directory, an oci-archive, or a docker-archive
(``docker save``: ``manifest.json`` + config + layer tars, read in-process and
presented as a one-manifest layout). A tag (``org.opencontainers.image.ref.name``
or a docker ``RepoTags`` entry) or a manifest digest picks the image; an index
resolves to this host's platform (`host_platform`).

The unpacking is our own (tarfile) rather than umoci's so verification and
refusal happen in one pass and in-process; umoci/skopeo only appear in the test
asset builder. Building images of our own (tests, demo, the microVM guest, the
oci-archive a consumer ships) is `synord.runtimes.oci_build`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform as _platform
import shutil
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from .base import SpecError

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
# Docker-schema media types that skopeo may leave in a layout.
_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_DOCKER_INDEX = "application/vnd.docker.distribution.manifest.list.v2+json"
_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
_DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
# Layer media type -> compression: the one table of what is accepted.
LAYER_TYPES = {MT_LAYER_TAR: None, _DOCKER_LAYER_TAR: None, MT_LAYER_GZIP: "gzip",
               _DOCKER_LAYER_GZIP: "gzip", MT_LAYER_ZSTD: "zstd"}
# Linux `uname -m` -> OCI (GOARCH, variant).
_ARCH = {"x86_64": ("amd64", None), "amd64": ("amd64", None), "aarch64": ("arm64", None),
         "arm64": ("arm64", None), "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
         "ppc64le": ("ppc64le", None), "s390x": ("s390x", None), "riscv64": ("riscv64", None),
         "i686": ("386", None), "i386": ("386", None)}
REF_ANNOTATION = "org.opencontainers.image.ref.name"
MAX_JSON_BLOB = 4 << 20  # manifests/configs are small; refuse to slurp a huge "json"


@dataclass
class ImageConfig:
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)  # "KEY=value", image order
    workdir: str = "/"
    user: str = ""
    digest: str = ""  # manifest digest "sha256:…": the image's identity

    def env_dict(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in self.env:
            k, _, v = item.partition("=")
            out[k] = v
        return out


# --------------------------------------------------------------------------
# Reading blobs from a layout directory or an oci-archive tarball


class _Layout:
    """Blob access for a layout dir or an (uncompressed) oci-archive tar."""

    def __init__(self, image: Path):
        self.image = Path(image)
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if not self.image.exists():
            raise SpecError(f"image {self.image} does not exist")
        if self.image.is_file():
            try:
                self._tar = tarfile.open(self.image, "r:")
            except (tarfile.TarError, OSError) as e:
                raise SpecError(f"image {self.image.name}: not an oci-archive tarball ({e})") from None
            for m in self._tar.getmembers():
                name = m.name.removeprefix("./")
                if m.isfile():
                    self._members[name] = m
            if "index.json" not in self._members and "manifest.json" in self._members:
                self._docker = _DockerArchive(self)

    _docker: "_DockerArchive | None" = None

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()

    def open(self, rel: str) -> IO[bytes]:
        if self._tar is not None:
            m = self._members.get(rel)
            if m is None:
                raise SpecError(f"image {self.image.name}: {rel} is missing")
            f = self._tar.extractfile(m)
            assert f is not None
            return f
        p = self.image / rel
        if not p.is_file() or p.is_symlink():
            raise SpecError(f"image {self.image.name}: {rel} is missing")
        return open(p, "rb")

    def json_file(self, rel: str) -> dict:
        with self.open(rel) as f:
            data = f.read(MAX_JSON_BLOB + 1)
        return _parse_json(data, rel)

    def blob_path(self, digest: str) -> str:
        if self._docker is not None and digest in self._docker.paths:
            return self._docker.paths[digest]
        return f"blobs/sha256/{_hex(digest)}"

    def verified_blob(self, desc: dict) -> bytes:
        """Small blob (manifest/config), read whole and checked against desc."""
        digest, size = _desc(desc)
        if size > MAX_JSON_BLOB:
            raise SpecError(f"blob {digest} is {size} bytes, too big for a manifest/config")
        if self._docker is not None and digest in self._docker.blobs:
            data = self._docker.blobs[digest]
        else:
            with self.open(self.blob_path(digest)) as f:
                data = f.read(size + 1)
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if len(data) != size or actual != digest:
            raise SpecError(f"blob {digest}: content does not match its digest "
                            f"(got {actual}, {len(data)} bytes, expected {size})")
        return data

    def verify_stream(self, desc: dict) -> None:
        """Hash a (possibly large) blob without keeping it in memory."""
        digest, size = _desc(desc)
        h = hashlib.sha256()
        n = 0
        with self.open(self.blob_path(digest)) as f:
            while block := f.read(1 << 20):
                h.update(block)
                n += len(block)
        if n != size or "sha256:" + h.hexdigest() != digest:
            raise SpecError(f"blob {digest}: content does not match its digest "
                            f"(got sha256:{h.hexdigest()}, {n} bytes, expected {size})")


class _DockerArchive:
    """A ``docker save`` tarball (manifest.json, <config>.json, <id>/layer.tar)
    presented as a layout: each image gets a synthetic OCI manifest whose
    blobs point at the archive's members by their sha256 (hashed here, and
    checked again like any blob when read)."""

    def __init__(self, layout: _Layout):
        self.paths: dict[str, str] = {}  # digest -> member name
        self.blobs: dict[str, bytes] = {}  # synthetic manifests
        name = layout.image.name
        with layout.open("manifest.json") as f:
            data = f.read(MAX_JSON_BLOB + 1)
        try:
            entries = json.loads(data) if len(data) <= MAX_JSON_BLOB else None
        except (ValueError, UnicodeDecodeError):
            entries = None
        if not isinstance(entries, list) or not entries:
            raise SpecError(f"image {name}: docker-archive manifest.json lists no images")
        self.index: list[dict] = []
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str) \
                    or not isinstance(entry.get("Layers"), list):
                raise SpecError(f"image {name}: malformed docker-archive manifest.json entry")
            config = self._member(layout, entry["Config"], "application/vnd.docker.container.image.v1+json")
            layers = [self._member(layout, str(m), None) for m in entry["Layers"]]
            manifest = _canon({"schemaVersion": 2, "mediaType": _DOCKER_MANIFEST,
                               "config": config, "layers": layers})
            digest = _sha(manifest)
            self.blobs[digest] = manifest
            self.paths[digest] = "\0synthetic/" + digest
            tags = [t for t in entry.get("RepoTags") or [] if isinstance(t, str)]
            self.index.append({"mediaType": _DOCKER_MANIFEST, "digest": digest, "size": len(manifest),
                               "tags": tags})

    def _member(self, layout: _Layout, rel: str, media_type: str | None) -> dict:
        rel = rel.removeprefix("./")
        h, n, head = hashlib.sha256(), 0, b""
        with layout.open(rel) as f:
            while block := f.read(1 << 20):
                head = head or block[:4]
                h.update(block)
                n += len(block)
        if media_type is None:  # docker saves plain tars; tolerate compressed ones
            media_type = (_DOCKER_LAYER_GZIP if head.startswith(b"\x1f\x8b") else
                          MT_LAYER_ZSTD if head.startswith(b"\x28\xb5\x2f\xfd") else _DOCKER_LAYER_TAR)
        digest = "sha256:" + h.hexdigest()
        self.paths[digest] = rel
        return {"mediaType": media_type, "digest": digest, "size": n}


def host_platform() -> tuple[str, str, str | None]:
    """This host's (os, architecture, variant) the way an OCI index names them."""
    arch, variant = _ARCH.get(_platform.machine().lower(), (_platform.machine().lower(), None))
    return "linux", arch, variant


def _platform_matches(desc: dict, want: tuple[str, str, str | None]) -> bool:
    p = desc.get("platform")
    if not isinstance(p, dict):
        return True  # no platform given: a single-platform entry
    os_, arch, variant = want
    return (p.get("os") in (None, os_) and p.get("architecture") in (None, arch)
            and (variant is None or p.get("variant") in (None, variant)))


def _desc(desc: dict) -> tuple[str, int]:
    try:
        digest, size = desc["digest"], int(desc["size"])
    except (KeyError, TypeError, ValueError):
        raise SpecError(f"malformed descriptor {desc!r}") from None
    if not isinstance(digest, str) or size < 0:
        raise SpecError(f"malformed descriptor {desc!r}")
    return digest, size


def _parse_json(data: bytes, what: str) -> dict:
    if len(data) > MAX_JSON_BLOB:
        raise SpecError(f"{what} is too large")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise SpecError(f"{what} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise SpecError(f"{what} is not a JSON object")
    return obj


def _select_manifest(layout: _Layout, ref: str | None) -> dict:
    """The manifest descriptor ``ref`` names, for this host's platform."""
    return _resolve_platform(layout, _select_top(layout, ref))


def _select_top(layout: _Layout, ref: str | None) -> dict:
    """The descriptor ``ref`` names (a tag, or a manifest digest "sha256:…"): a
    manifest, or an index still to resolve to a platform."""
    name = layout.image.name
    if layout._docker is not None:
        manifests = layout._docker.index
    else:
        manifests = layout.json_file("index.json").get("manifests") or []
    if not isinstance(manifests, list) or not manifests or not all(isinstance(m, dict) for m in manifests):
        raise SpecError(f"image {name}: its index lists no manifests")

    def tags(m: dict) -> list[str]:
        # docker-archive RepoTags "docker.io/library/app:tag": "library/app:tag", "app:tag", "tag" match too
        names = [(m.get("annotations") or {}).get(REF_ANNOTATION)]
        for t in m.get("tags") or []:
            names += [t, t.removeprefix("docker.io/"), t.removeprefix("docker.io/library/"), t.rpartition(":")[2]]
        return names

    if ref is not None and ref.startswith("sha256:"):
        desc = _find_digest(layout, manifests, ref)
    elif ref is not None:
        found = [m for m in manifests if ref in tags(m)]
        if not found:
            raise SpecError(f"image {name}: no manifest tagged {ref!r}")
        desc = found[0]
    else:
        # One image (one entry, or one per platform): no need to name it. Else "latest".
        untagged_platforms = all(isinstance(m.get("platform"), dict) for m in manifests)
        if len(manifests) == 1:
            desc = manifests[0]
        elif untagged_platforms:
            desc = {"mediaType": MT_INDEX, "manifests": manifests}
        else:
            latest = [m for m in manifests if "latest" in tags(m)]
            if not latest:
                raise SpecError(f"image {name} holds {len(manifests)} images; name a tag or digest "
                                f"(--image-ref)")
            desc = latest[0]
    return desc


def _find_digest(layout: _Layout, manifests: list[dict], digest: str) -> dict:
    for m in manifests:
        if m.get("digest") == digest:
            return m
    for m in manifests:  # one level down: a platform manifest inside a tagged index
        if m.get("mediaType") in (MT_INDEX, _DOCKER_INDEX):
            sub = _parse_json(layout.verified_blob(m), "nested index").get("manifests") or []
            for s in sub:
                if isinstance(s, dict) and s.get("digest") == digest:
                    return s
    raise SpecError(f"image {layout.image.name}: no manifest {digest}")


def _resolve_platform(layout: _Layout, desc: dict) -> dict:
    want = host_platform()
    for _ in range(2):  # an index, possibly nested once
        if desc.get("mediaType", MT_MANIFEST) not in (MT_INDEX, _DOCKER_INDEX):
            return desc
        sub = desc["manifests"] if "manifests" in desc else \
            _parse_json(layout.verified_blob(desc), "nested index").get("manifests") or []
        cands = [m for m in sub if isinstance(m, dict) and _platform_matches(m, want)]
        if not cands:
            have = sorted({"/".join(filter(None, (p.get("os"), p.get("architecture"), p.get("variant"))))
                           for m in sub if isinstance(m, dict) and isinstance(p := m.get("platform"), dict)})
            raise SpecError(f"image {layout.image.name}: no {'/'.join(filter(None, want))} manifest "
                            f"(has {', '.join(have) or 'none'})")
        desc = cands[0]
    raise SpecError(f"image {layout.image.name}: indexes nested too deeply")


def check_image(image: Path, ref: str | None = None) -> ImageConfig:
    """THE acceptance check: what the consumer refuses at submission and what a
    provider refuses before it takes a task are the same (SpecError, with the reason)."""
    return read_image(image, ref)[0]


def read_image(image: Path, ref: str | None = None) -> tuple[ImageConfig, list[dict], list[str]]:
    """Verify index → manifest → config → layers of an image without unpacking.

    Returns the config, the layer descriptors and the config's diff_ids."""
    layout = _Layout(image)
    try:
        return _read_image(layout, ref)
    finally:
        layout.close()


def _read_image(layout: _Layout, ref: str | None) -> tuple[ImageConfig, list[dict], list[str]]:
    mdesc = _select_manifest(layout, ref)
    manifest = _parse_json(layout.verified_blob(mdesc), "manifest")
    if manifest.get("mediaType", MT_MANIFEST) not in (MT_MANIFEST, _DOCKER_MANIFEST):
        raise SpecError(f"unsupported manifest type {manifest.get('mediaType')!r}")
    cfg = _parse_json(layout.verified_blob(manifest.get("config") or {}), "image config")
    layers = manifest.get("layers") or []
    if not isinstance(layers, list):
        raise SpecError("manifest layers is not a list")
    for layer in layers:
        if not isinstance(layer, dict) or layer.get("mediaType", MT_LAYER_GZIP) not in LAYER_TYPES:
            mt = layer.get("mediaType") if isinstance(layer, dict) else layer
            raise SpecError(f"unsupported layer media type {mt!r} "
                            f"(accepted: tar, tar+gzip, tar+zstd)")
    for layer in layers:
        layout.verify_stream(layer)
    diff_ids = list((cfg.get("rootfs") or {}).get("diff_ids") or [])
    if diff_ids and len(diff_ids) != len(layers):
        raise SpecError(f"image config lists {len(diff_ids)} diff_ids for {len(layers)} layers")
    c = cfg.get("config") or {}

    def strlist(v, what) -> list[str]:
        if v is None:
            return []
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise SpecError(f"image config {what} must be a list of strings")
        return list(v)

    conf = ImageConfig(entrypoint=strlist(c.get("Entrypoint"), "Entrypoint"),
                       cmd=strlist(c.get("Cmd"), "Cmd"), env=strlist(c.get("Env"), "Env"),
                       workdir=str(c.get("WorkingDir") or "/"), user=str(c.get("User") or ""),
                       digest=mdesc["digest"])
    return conf, layers, diff_ids


def export_image(image: Path, ref: str | None, dest: Path) -> None:
    """Write an OCI layout at ``dest`` holding only the image ``ref`` names (and
    only the blobs it reaches), from any accepted input (a docker-archive too):
    what travels to a provider then needs no ref and one reader. An index stays
    an index, so each provider still picks its own platform."""
    layout = _Layout(image)
    dest = Path(dest)
    try:
        top = _select_top(layout, ref)
        if "manifests" in top:  # several platforms listed at the top: keep them as one index
            index = _canon({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": top["manifests"]})
            top = {"mediaType": MT_INDEX, "digest": _sha(index), "size": len(index)}
            layout_blobs = {top["digest"]: index}
        else:
            layout_blobs = {}
        blobs = dest / "blobs" / "sha256"
        blobs.mkdir(parents=True, exist_ok=True)

        def copy(desc: dict, depth: int = 0) -> None:
            if depth > 3:
                raise SpecError(f"image {layout.image.name}: indexes nested too deeply")
            digest, _size = _desc(desc)
            target = blobs / _hex(digest)
            mt = desc.get("mediaType", MT_MANIFEST)
            if mt in (MT_INDEX, _DOCKER_INDEX, MT_MANIFEST, _DOCKER_MANIFEST):
                data = layout_blobs.get(digest) or layout.verified_blob(desc)
                target.write_bytes(data)
                obj = _parse_json(data, "manifest")
                children = (obj.get("manifests") if mt in (MT_INDEX, _DOCKER_INDEX)
                            else [obj.get("config")] + list(obj.get("layers") or []))
                for child in children or []:
                    copy(child if isinstance(child, dict) else {}, depth + 1)
            else:
                with layout.open(layout.blob_path(digest)) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)

        copy(top)
        entry = {k: v for k, v in top.items() if k in ("mediaType", "digest", "size", "platform")}
        tag = ref if ref and not ref.startswith("sha256:") else "latest"
        entry["annotations"] = {REF_ANNOTATION: tag.rpartition(":")[2]}
        (dest / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        (dest / "index.json").write_bytes(_canon({"schemaVersion": 2, "manifests": [entry]}))
    finally:
        layout.close()


def needs_export(image: Path, ref: str | None) -> bool:
    """A ref to apply, or a docker-archive: `export_image` makes what travels."""
    if ref:
        return True
    layout = _Layout(image)
    try:
        return layout._docker is not None
    finally:
        layout.close()


def _hex(digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd):
        raise SpecError(f"unsupported or malformed digest {digest!r}")
    return hexd


# --------------------------------------------------------------------------
# Unpacking


class _HashingReader(io.RawIOBase):
    """Wrap a stream; hash and count what is read through it (for diff_ids)."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.h = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.raw.read(len(b))
        n = len(data)
        b[:n] = data
        self.h.update(data)
        return n

    def drain(self) -> str:
        """Read what tarfile left (end-of-archive padding) so the hash covers it all."""
        while block := self.raw.read(1 << 20):
            self.h.update(block)
        return "sha256:" + self.h.hexdigest()


def unpack_image(image: Path, dest_rootfs: Path, ref: str | None = None) -> ImageConfig:
    """Verify ``image`` and unpack its layers into ``dest_rootfs`` (created, must not exist or be empty).

    On any refusal the partial rootfs is removed and `SpecError` raised."""
    image, dest = Path(image), Path(dest_rootfs)
    layout = _Layout(image)
    try:
        conf, layers, diff_ids = _read_image(layout, ref)  # verifies all blobs first
        if dest.exists() and any(dest.iterdir()):
            raise SpecError(f"unpack target {dest} is not empty")
        dest.mkdir(parents=True, exist_ok=True)
        try:
            for i, layer in enumerate(layers):
                mt = layer.get("mediaType", MT_LAYER_GZIP)
                with layout.open(layout.blob_path(layer["digest"])) as raw:
                    reader = _HashingReader(_decompressed(LAYER_TYPES[mt], raw))
                    try:
                        _apply_layer(io.BufferedReader(reader, 1 << 16), dest, layer["digest"])
                        diff = reader.drain()
                    except (OSError, EOFError, zlib.error, tarfile.TarError, _ZstdError) as e:
                        raise SpecError(f"layer {layer['digest']}: unreadable ({e})") from None
                if diff_ids and diff != diff_ids[i]:
                    raise SpecError(f"layer {layer['digest']}: uncompressed digest {diff} "
                                    f"does not match diff_id {diff_ids[i]}")
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        return conf
    finally:
        layout.close()


try:
    import zstandard as _zstd
    _ZstdError: type[Exception] = _zstd.ZstdError
except ImportError:  # pragma: no cover - a dependency; say so when a zstd layer comes
    _zstd = None
    _ZstdError = OSError


def _decompressed(compression: str | None, raw: IO[bytes]) -> IO[bytes]:
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "zstd":
        if _zstd is None:
            raise SpecError("zstd layers need the zstandard module (pip install zstandard)")
        return _zstd.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return raw


def _clean_name(name: str, layer: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if p.is_absolute():
        raise SpecError(f"layer {layer}: absolute path {name!r} refused")
    parts = [x for x in p.parts if x != "."]
    if ".." in parts:
        raise SpecError(f"layer {layer}: path traversal {name!r} refused")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _resolve_parent(root: Path, rel: PurePosixPath, layer: str, name: str) -> Path:
    """Host path of ``rel``'s parent directory, following in-root symlinks only.

    A symlink on the way whose target leaves the rootfs (absolute, or ``..``
    above the root) is refused: the host would write outside."""
    cur: list[str] = []
    todo = list(rel.parent.parts) if str(rel.parent) != "." else []
    hops = 0
    while todo:
        comp = todo.pop(0)
        if comp in ("", "."):
            continue
        if comp == "..":
            if not cur:
                raise SpecError(f"layer {layer}: {name!r} resolves outside the rootfs")
            cur.pop()
            continue
        host = root.joinpath(*cur, comp)
        try:
            st = os.lstat(host)
        except FileNotFoundError:
            os.mkdir(host, 0o755)
            cur.append(comp)
            continue
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            target = os.readlink(host)
            if hops > 40:
                raise SpecError(f"layer {layer}: {name!r}: too many symlinks")
            if target.startswith("/"):
                # Re-rooted as the container sees it (Debian's var/run -> /run), never the host's.
                cur = []
                target = target.lstrip("/")
            todo = list(PurePosixPath(target).parts) + todo
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise SpecError(f"layer {layer}: {name!r} has non-directory parent {'/'.join(cur + [comp])}")
        cur.append(comp)
    return root.joinpath(*cur)


def resolve_in_root(root: Path, path: str) -> Path:
    """Host path for ``path`` inside ``root``; parents resolved (and created) as the
    container would see them, never escaping the root. The last component is not followed."""
    rel = _clean_name(path.lstrip("/"), "path")
    if str(rel) == ".":
        return Path(root)
    return _resolve_parent(Path(root), rel, "path", path) / rel.name


def _remove(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _apply_layer(stream: IO[bytes], root: Path, layer: str) -> None:
    created: set[str] = set()  # paths this layer made (an opaque whiteout keeps them)
    opaque: list[tuple[Path, str]] = []
    rootful = os.geteuid() == 0
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for m in tar:
            rel = _clean_name(m.name, layer)
            if str(rel) == ".":
                continue
            base = rel.name
            parent = _resolve_parent(root, rel, layer, m.name)
            if base == ".wh..wh..opq":
                opaque.append((parent, str(rel.parent)))
                continue
            if base.startswith(".wh."):
                _remove(parent / base[4:])
                continue
            target = parent / base
            created.add(str(rel))
            if m.ischr() or m.isblk():
                raise SpecError(f"layer {layer}: device node {m.name!r} refused")
            mode = m.mode & 0o1777  # drop setuid/setgid: nothing in a task needs them
            if m.isdir():
                try:
                    st = os.lstat(target)
                    if not stat.S_ISDIR(st.st_mode):
                        _remove(target)
                        os.mkdir(target, 0o755)
                except FileNotFoundError:
                    os.mkdir(target, 0o755)
                # Right away, not deferred: a later entry could swap the dir for a symlink.
                # (As root a read-only dir does not stop its own filling; rootless, we keep u+rwx.)
                os.chmod(target, mode if rootful else mode | 0o700)
                _chown(target, m, rootful)
            elif m.isfile():
                _remove_nondir(target)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as out:
                    src = tar.extractfile(m)
                    assert src is not None
                    shutil.copyfileobj(src, out, 1 << 20)
                    os.fchmod(out.fileno(), mode)
                    if rootful:
                        os.fchown(out.fileno(), m.uid, m.gid)
            elif m.issym():
                _remove_nondir(target)
                os.symlink(m.linkname, target)
                _chown(target, m, rootful)
            elif m.islnk():
                lrel = _clean_name(m.linkname, layer)
                src = _resolve_parent(root, lrel, layer, m.linkname) / lrel.name
                st = os.lstat(src) if os.path.lexists(src) else None
                if st is None or not stat.S_ISREG(st.st_mode):
                    raise SpecError(f"layer {layer}: hard link {m.name!r} -> {m.linkname!r} "
                                    f"does not point at a regular file in the image")
                _remove_nondir(target)
                os.link(src, target, follow_symlinks=False)
            elif m.isfifo():
                _remove_nondir(target)
                os.mkfifo(target, mode)
            else:
                raise SpecError(f"layer {layer}: unsupported entry type for {m.name!r}")
    for parent, prel in opaque:
        for child in list(parent.iterdir()):
            crel = child.name if prel == "." else f"{prel}/{child.name}"
            if crel not in created:
                _remove(child)


def _chown(target: Path, m: tarfile.TarInfo, rootful: bool) -> None:
    # Rootless (the service user), everything stays ours: the container's user
    # namespace maps the image's user onto us (synord.runtimes.container.rootless_mappings).
    if rootful:
        os.lchown(target, m.uid, m.gid)


def _remove_nondir(target: Path) -> None:
    if os.path.lexists(target):
        _remove(target)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canon(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
