"""Sandboxes behind one interface (`synord.runtimes.base`): wasm (wasmtime), container
(OCI via crun/runc, runsc for checkpointable tasks), microvm (Firecracker when
present, QEMU microvm otherwise). Nothing here imports `synord`.

The registry: `get_runtime(kind)` and `available_all()`, what both `synord
probe` and the daemon report. Implementations are imported on first use, so
importing this package (the CLI, the container reaper) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Iterable

from synord.protocols.kinds import RUNTIME_KINDS as KINDS

if TYPE_CHECKING:
    from .base import Runtime

# kind -> (module of this package, class); keyed by exactly the wire's kinds
# (tests/test_runtime_registry.py)
_IMPLEMENTATIONS = {
    "wasm": (".wasm", "WasmRuntime"),
    "container": (".container", "ContainerRuntime"),
    "microvm": (".microvm", "MicroVMRuntime"),
}


def get_runtime(kind: str) -> "Runtime":
    """A new Runtime for ``kind``; SpecError for a kind there is none of."""
    if kind not in _IMPLEMENTATIONS:
        from .base import SpecError
        raise SpecError(f"unknown runtime {kind!r} (expected one of {', '.join(KINDS)})")
    module, cls = _IMPLEMENTATIONS[kind]
    return getattr(importlib.import_module(module, __name__), cls)()


def available_all(enabled: Iterable[str] | None = None) -> dict[str, dict]:
    """{kind: {"available", "reason"}} for every kind, in KINDS order. A kind not
    in ``enabled`` (None: all) is reported off with "disabled in config"; a
    runtime whose module fails to import or probe is reported off with the
    error, never raised: one broken sandbox must not stop a probe or a node."""
    on = set(KINDS if enabled is None else enabled)
    out: dict[str, dict] = {}
    for kind in KINDS:
        if kind not in on:
            out[kind] = {"available": False, "reason": "disabled in config"}
            continue
        try:
            out[kind] = get_runtime(kind).available().to_json()
        except Exception as exc:
            out[kind] = {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    if "microvm" in on:  # whether a microVM could take a GPU, and why not
        from . import vfio
        vfio.annotate(out)
    return out
