"""GPUs as allocatable units: each device by a stable id, its market class and
the CDI name that injects it into a container.

NVIDIA GPUs are named by their NVML UUID (``GPU-…``); a GPU in MIG mode is
offered as its MIG instances instead (``MIG-…``, class ``<slug>-<profile>``
such as ``h100-1g-10gb``: order names allow no dots).  AMD and Intel GPUs are
named by PCI bus id; their device nodes come from sysfs (``/dev/kfd`` and the
card's ``renderD*`` for AMD, the ``renderD*`` for Intel).
"""

from __future__ import annotations

import re
from pathlib import Path

from . import known

_CLASS_RE = re.compile(r"[^a-z0-9_-]+")


def gpu_class(dev: dict) -> str:
    """The market's gpu_class: the known-table slug of a datacenter GPU, else ``consumer``."""
    if dev.get("tier") == "datacenter" and dev.get("slug"):
        return dev["slug"]
    return "consumer"


def mig_class(parent: dict, profile: str) -> str:
    """``h100`` + ``1g.10gb`` -> ``h100-1g-10gb``."""
    return _CLASS_RE.sub("-", f"{gpu_class(parent)}-{profile.lower()}").strip("-")[:32]


def render_node(root: str | Path, bus_id: str) -> str | None:
    drm = Path(root) / "sys/bus/pci/devices" / bus_id / "drm"
    nodes = sorted(p.name for p in drm.glob("renderD*")) if drm.is_dir() else []
    return f"/dev/dri/{nodes[0]}" if nodes else None


def gpu_units(devices: list[dict], root: str | Path = "/") -> list[dict]:
    """One dict per allocatable unit: id, class, vendor, memory_bytes,
    compute_capability, cdi (qualified CDI name) and what generating its CDI
    spec needs (minor / nodes)."""
    out: list[dict] = []
    for d in devices:
        if d.get("kind") != "gpu" or d.get("usable") is False or d.get("integrated"):
            continue
        vendor = d.get("vendor")
        if vendor == "NVIDIA":
            migs = d.get("mig_devices") or []
            if (d.get("mig_mode") or {}).get("current") and migs:
                for m in migs:
                    if m.get("uuid"):
                        out.append({"id": m["uuid"], "class": mig_class(d, m.get("profile") or "mig"),
                                    "vendor": "nvidia", "memory_bytes": m.get("memory_bytes"),
                                    "compute_capability": d.get("compute_capability"),
                                    "cdi": f"nvidia.com/gpu={m['uuid']}", "parent": d.get("uuid"),
                                    "minor": d.get("minor_number"), "index": d.get("index"),
                                    "gi": m.get("gi"), "ci": m.get("ci")})
                continue
            if not d.get("uuid"):
                continue  # an unnamed device cannot be allocated by name
            out.append({"id": d["uuid"], "class": gpu_class(d), "vendor": "nvidia",
                        "memory_bytes": d.get("memory_bytes"), "compute_capability": d.get("compute_capability"),
                        "cdi": f"nvidia.com/gpu={d['uuid']}", "minor": d.get("minor_number"),
                        "index": d.get("index"), "power_limit_w": d.get("power_limit_w")})
        elif vendor in ("AMD", "Intel") and d.get("pci_bus_id"):
            render = render_node(root, d["pci_bus_id"])
            if render is None:
                continue
            nodes = ["/dev/kfd", render] if vendor == "AMD" else [render]
            name = d["pci_bus_id"].replace(":", "-")
            out.append({"id": d["pci_bus_id"], "class": gpu_class(d), "vendor": vendor.lower(),
                        "memory_bytes": d.get("memory_bytes"), "compute_capability": None,
                        "cdi": f"{vendor.lower()}.com/gpu={name}", "nodes": nodes,
                        # where its counters are (amdgpu: metered from sysfs, synord.gpu_meter)
                        "sysfs": str(Path(root) / "sys/bus/pci/devices" / d["pci_bus_id"])})
    return out


_VENDORS = {"0x10de": "nvidia", "0x1002": "amd", "0x8086": "intel"}


def vfio_units(passthrough: list[dict]) -> list[dict]:
    """Units for GPUs bound to ``vfio-pci`` (synord.runtimes.vfio.passthrough_gpus): a
    microVM takes them whole, by PCI bus id. They are other units than a container's:
    the host has no /dev/nvidiaN for them and NVML does not see them, so their class
    and memory come from the known-device table by PCI id, and nothing meters them."""
    out = []
    for g in passthrough:
        vendor = (g.get("vendor") or "").lower()
        pci_id = f"{vendor[2:]}:{(g.get('device') or '')[2:].lower()}"
        entry = known.match(None, pci_id)
        d = {"tier": entry["tier"], "slug": entry["slug"]} if entry else {}
        out.append({"id": g["pci_bus_id"], "class": gpu_class(d), "vendor": _VENDORS.get(vendor, vendor),
                    "memory_bytes": (entry or {}).get("memory_bytes"), "compute_capability": None,
                    "cdi": None, "runtimes": ["microvm"],
                    "vfio": {"pci_bus_id": g["pci_bus_id"], "iommu_group": g["iommu_group"]}})
    return out
