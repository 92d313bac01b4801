"""A job's GPU request (CLI ``--gpus N --gpu-class C --gpu-memory SIZE
--cuda-capability X.Y``, the control API's and the job spec's ``gpus``,
``gpu_class``, ``gpu_memory``, ``cuda_capability``): checked at submission,
before anything is reserved anywhere."""

from __future__ import annotations

import re

from synord.protocols.orders import MAX_GPUS, MAX_MEMORY

# Sandboxes that can be given a device: containers through CDI (synord.runtimes.cdi),
# microVMs a whole GPU bound to vfio-pci (synord.runtimes.vfio).
DEVICE_KINDS = ("container", "microvm")
_CLASS_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_CUDA_RE = re.compile(r"^[0-9]{1,2}\.[0-9]{1,2}$")


def gpu_request(req: dict, kind: str) -> dict | None:
    """The validated request ({gpus, gpu_class, gpu_memory, cuda}), None when no GPU
    is asked for; ValueError with the reason otherwise."""
    n = req.get("gpus") or 0
    extras = [k for k in ("gpu_class", "gpu_memory", "cuda_capability") if req.get(k) not in (None, "")]
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_GPUS:
        raise ValueError(f"gpus must be an integer in [0, {MAX_GPUS}]")
    if not n:
        if extras:
            raise ValueError(f"{extras[0]} needs --gpus N")
        return None
    if kind not in DEVICE_KINDS:
        why = "a WASM sandbox cannot be given devices" if kind == "wasm" else f"{kind} cannot take devices"
        raise ValueError(f"a GPU task needs the container or microvm runtime: {why}")
    cls = req.get("gpu_class") or None
    if cls is not None:
        cls = str(cls).removeprefix("gpu.")  # `synord book` shows gpu.<class>
        if not _CLASS_RE.match(cls):
            raise ValueError("gpu_class must be a class name such as h100, a100 or h100-1g-10gb")
    mem = req.get("gpu_memory")
    if mem is not None and (isinstance(mem, bool) or not isinstance(mem, int) or not 0 < mem <= MAX_MEMORY):
        raise ValueError("gpu_memory must be a positive number of bytes")
    cuda = req.get("cuda_capability")
    if cuda is not None and (not isinstance(cuda, str) or not _CUDA_RE.match(cuda)):
        raise ValueError("cuda_capability must be MAJOR.MINOR, e.g. 8.0")
    return {"gpus": n, "gpu_class": cls, "gpu_memory": mem, "cuda": cuda}
