"""OpenCL devices through pyopencl (PoCL on machines without a GPU).

No ICD / no platform is normal (pyopencl raises LogicError -1001): no devices.
The same physical device can show up under several platforms (vendor ICD
plus Mesa rusticl or PoCL); it is listed once, from the first platform.
"""

from __future__ import annotations

import os

from . import known

# Generic implementations that duplicate a vendor's own driver.
_GENERIC_PLATFORMS = ("portable computing language", "rusticl", "clover")


def _ensure_kernel_cache() -> None:
    # A systemd service has no writable $HOME; give PoCL its CacheDirectory so
    # kernels built by --bench survive restarts. Must happen before the ICD loads.
    if "POCL_CACHE_DIR" not in os.environ and os.environ.get("CACHE_DIRECTORY"):
        os.environ["POCL_CACHE_DIR"] = os.path.join(os.environ["CACHE_DIRECTORY"].split(":")[0], "pocl")


def _platforms():
    """[(platform, [devices])], or ([], reason)."""
    _ensure_kernel_cache()
    try:
        import pyopencl as cl
    except ImportError as e:
        return [], f"pyopencl not importable: {e}"
    try:
        plats = cl.get_platforms()
    except cl.Error as e:  # -1001: no ICD installed
        return [], f"no OpenCL platform ({e.__class__.__name__})"
    out = []
    for p in plats:
        try:
            out.append((p, p.get_devices()))
        except cl.Error:
            continue  # a platform with no devices raises DEVICE_NOT_FOUND
    return out, None


def _attr(dev, name, default=None):
    try:
        return getattr(dev, name)
    except Exception:  # pyopencl raises LogicError/RuntimeError for unsupported queries
        return default


def _pci_bus(dev) -> str | None:
    """PCI address from the vendor query extensions (pyopencl lacks the khr one)."""
    exts = _attr(dev, "extensions", "") or ""
    try:
        if "cl_nv_device_attribute_query" in exts:
            dom = _attr(dev, "pci_domain_id_nv", 0) or 0
            return f"{dom:04x}:{dev.pci_bus_id_nv:02x}:{dev.pci_slot_id_nv:02x}.0"
        if "cl_amd_device_attribute_query" in exts:
            topo = dev.topology_amd
            return f"0000:{topo.bus:02x}:{topo.device:02x}.{topo.function}"
    except Exception:  # the query is optional; dedupe by name instead
        return None
    return None


def dedupe(entries: list[dict]) -> list[int]:
    """Indexes of the entries to keep: one per physical device, preferring a
    vendor platform over a generic one (PoCL, rusticl, clover)."""
    order = sorted(range(len(entries)), key=lambda i: (
        any(g in entries[i]["platform"].lower() for g in _GENERIC_PLATFORMS), i))
    seen, keep = set(), []
    for i in order:
        e = entries[i]
        key = ("pci", e["pci_bus_id"]) if e.get("pci_bus_id") else (
            e["model"], e.get("vendor_id"), e["compute_units"], e["device_type"])
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return sorted(keep)


def _type_name(dev) -> str:
    import pyopencl as cl
    t = _attr(dev, "type", 0)
    if t & cl.device_type.GPU:
        return "gpu"
    if t & cl.device_type.ACCELERATOR:
        return "accelerator"
    if t & cl.device_type.CPU:
        return "cpu"
    return "other"


def _describe(plat, dev) -> dict:
    name = (_attr(dev, "name", "") or "").strip()
    dtype = _type_name(dev)
    exts = (_attr(dev, "extensions", "") or "").split()
    entry = known.match(name) if dtype != "cpu" else None
    return {
        "kind": "opencl",
        "vendor": (_attr(dev, "vendor", "") or "").strip(),
        "model": name,
        "memory_bytes": _attr(dev, "global_mem_size"),
        "throughput": known.throughput(entry),
        "device_type": dtype,
        "platform": plat.name.strip(),
        "platform_version": plat.version.strip(),
        "opencl_version": (_attr(dev, "version", "") or "").strip(),
        "driver_version": (_attr(dev, "driver_version", "") or "").strip(),
        "vendor_id": _attr(dev, "vendor_id"),
        "compute_units": _attr(dev, "max_compute_units"),
        "max_clock_mhz": _attr(dev, "max_clock_frequency"),
        "max_alloc_bytes": _attr(dev, "max_mem_alloc_size"),
        "fp16": "cl_khr_fp16" in exts or bool(_attr(dev, "half_fp_config", 0)),
        "fp64": "cl_khr_fp64" in exts or bool(_attr(dev, "double_fp_config", 0)),
        "pci_bus_id": _pci_bus(dev),
    }


def probe_opencl() -> tuple[list[dict], str | None, list]:
    """(devices, reason when none, the pyopencl device objects in the same order)."""
    plats, reason = _platforms()
    if not plats:
        return [], reason, []
    pairs = [(_describe(plat, dev), dev) for plat, devs in plats for dev in devs]
    keep = dedupe([info for info, _ in pairs])
    return [pairs[i][0] for i in keep], None, [pairs[i][1] for i in keep]
