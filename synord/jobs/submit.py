"""Submission: an API request checked, whole, into a `JobSpec` before anything is reserved.

Everything a bad request can get wrong is refused here, with one line
(`errors.Invalid`, "bad task: …"): the artefact (a path on this node, a kind
we know, an image the providers will accept), args, env, limits and the price
cap. The artefact is then put in the blob store in the one-file form it
travels in, and the spec names it by digest.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from synord.protocols.ports import check_ports
from synord.protocols.tasks import TaskSpecError, check_args_env, check_limits
from synord.protocols.transfer import BlobStore
from synord.runtimes import KINDS
from synord.runtimes.artifacts import infer_kind
from synord.runtimes.base import SpecError

from ..errors import Invalid
from ..gpu_request import gpu_request
from .spec import DEFAULT_MEMORY, JobSpec


def validate(req: dict, home, blobs: BlobStore) -> JobSpec:
    """The request as a `JobSpec` (blocking: reads and hashes the artefact; run it in a thread)."""
    try:
        return _validate(req, home, blobs)
    except (SpecError, TaskSpecError, ValueError) as exc:
        raise Invalid(f"bad task: {exc}") from None


def _validate(req: dict, home, blobs: BlobStore) -> JobSpec:
    path = Path(str(req.get("artifact", "")))
    if not path.is_absolute():
        raise ValueError("artifact must be an absolute path on this node")
    kind = req.get("runtime") or infer_kind(path)
    if kind not in KINDS:
        raise ValueError(f"unknown runtime {kind!r}")
    if kind == "wasm" and path.is_dir():
        raise SpecError("a wasm task needs a .wasm module, not a directory")
    exported = _export_image(kind, path, req.get("image_ref"), home)
    try:
        return _validated(req, kind, path, exported or path, home, blobs)
    finally:
        if exported is not None:
            shutil.rmtree(exported, ignore_errors=True)


def _export_image(kind: str, path: Path, ref, home) -> Path | None:
    """A picked tag/digest or a docker-archive travels as a one-image OCI layout."""
    from synord.runtimes import oci
    if kind not in ("container", "microvm"):
        return None
    if ref is not None and not isinstance(ref, str):
        raise ValueError("image_ref must be a tag or a sha256:… digest")
    if not oci.needs_export(path, ref):
        return None
    home.artifacts.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix=".image-", dir=home.artifacts))
    try:
        oci.export_image(path, ref, dest)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def _validated(req: dict, kind: str, path: Path, image: Path, home, blobs: BlobStore) -> JobSpec:
    from synord.runtimes.artifacts import check_artifact, ship_form
    check_artifact(kind, image)  # not wasm / refused image (synord.runtimes.oci.check_image): refused here
    args = [str(a) for a in req.get("args") or []]
    env = {str(k): str(v) for k, v in (req.get("env") or {}).items()}
    check_args_env(args, env)
    memory = int(req.get("memory_bytes") or DEFAULT_MEMORY)
    limits = {"cpus": float(req.get("cpus") or 1.0), "memory_bytes": memory}
    if req.get("timeout_s"):
        limits["timeout_s"] = float(req["timeout_s"])
    check_limits(limits)
    gpu = gpu_request(req, kind)  # a GPU on a sandbox that cannot take one: refused here
    max_price = req.get("max_price")
    if max_price is not None and (not isinstance(max_price, (int, float)) or max_price < 0):
        raise ValueError("max_price must be a non-negative number")
    ports = check_ports(req.get("ports"))  # ValueError says what is wrong
    if ports and kind == "wasm":
        raise ValueError("ports need a container or microvm task (a wasm task has no network)")
    # One file on the wire: an image layout directory travels as its oci-archive.
    shipped = ship_form(kind, image, home.artifacts)
    sha = blobs.add_file(shipped)
    if shipped != image:
        shipped.unlink(missing_ok=True)
    return JobSpec(kind=kind, sha256=sha, args=tuple(args), env=tuple(env.items()), cpus=limits["cpus"],
                   memory_bytes=memory, timeout_s=limits.get("timeout_s"),
                   # A passed-through GPU (VFIO) blocks QEMU's migration: such a microVM cannot checkpoint.
                   checkpointable=(bool(req.get("checkpointable")) or kind in ("wasm", "microvm"))
                   and not (gpu and kind == "microvm"),
                   artifact=str(path), max_price=max_price, gpu=gpu, service=_service(req, kind),
                   ports=ports)


def _service(req: dict, kind: str) -> dict | None:
    """``service`` of the request (synord.protocols.servicespec), checked; None for a task."""
    from synord.protocols.servicespec import check_service
    if req.get("service") is None:
        return None
    if kind == "wasm":
        raise ValueError("a service runs in a container or a microVM: wasm tasks run to an exit")
    service = check_service(req["service"])
    if kind == "microvm" and service["volumes"]:
        raise ValueError("microVM services cannot have volumes yet (the guest has no shared filesystem)")
    if kind == "microvm" and service["health"] and "tcp" in service["health"]:
        raise ValueError("microVM services take --health-cmd (run through the guest), not --health-tcp")
    return service
