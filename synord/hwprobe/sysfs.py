"""Accelerators that have no user-space library we can rely on, read from
sysfs under a configurable root: AMD (amdgpu + KFD topology) and Intel
(i915/xe) GPUs, Google TPUs, AWS Neuron, Tenstorrent, Habana, Groq, other
PCI processing accelerators, NPUs (/sys/class/accel) and FPGAs
(/sys/class/fpga_manager)."""

from __future__ import annotations

import os
from pathlib import Path

from . import known

_TPU_IDS = {"005e": "TPU v4", "0063": "TPU v5e", "0062": "TPU v5p", "006f": "TPU v6e"}
# Amazon's PCI vendor also makes NICs and NVMe: only these are Neuron devices.
_NEURON_IDS = {"7064": "Inferentia", "7164": "Trainium", "7264": "Inferentia2", "7364": "Trainium2"}
# PCI vendor id -> (device kind, vendor name) for accelerator-only vendors.
_ACCEL_VENDORS = {"1e52": ("accelerator", "Tenstorrent"), "1da3": ("accelerator", "Habana"),
                  "1de0": ("accelerator", "Groq")}
_NPU_DRIVERS = {"intel_vpu": ("Intel", "Intel NPU"), "amdxdna": ("AMD", "AMD XDNA NPU"),
                "qaic": ("Qualcomm", "Qualcomm Cloud AI 100"), "rocket": ("Rockchip", "Rockchip NPU"),
                "ethosu": ("Arm", "Arm Ethos-U NPU")}


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _int(path: Path, base: int = 10) -> int | None:
    text = _read(path)
    try:
        return int(text, base) if text is not None else None
    except ValueError:
        return None


def _hex4(path: Path) -> str | None:
    text = _read(path)
    return text[2:].lower().zfill(4) if text and text.startswith("0x") else None


def _driver(dev: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(dev / "driver"))
    except OSError:
        return None


def _pci_common(dev: Path, vendor: str, device: str) -> dict:
    return {"pci_bus_id": dev.name, "pci_id": f"{vendor}:{device}", "driver": _driver(dev),
            "numa_node": _int(dev / "numa_node"),
            "pcie_link_speed": _read(dev / "current_link_speed"),
            "pcie_width": _int(dev / "current_link_width")}


def _kfd_nodes(root: Path) -> dict[str, dict[str, int]]:
    """PCI bus id -> KFD topology properties (GPU nodes only)."""
    out = {}
    for node in sorted((root / "sys/class/kfd/kfd/topology/nodes").glob("*")):
        props = {}
        for line in (_read(node / "properties") or "").splitlines():
            key, _, value = line.partition(" ")
            try:
                props[key] = int(value)
            except ValueError:
                pass
        if not props.get("simd_count"):
            continue  # CPU node
        loc = props.get("location_id", 0)
        bus = f"{props.get('domain', 0):04x}:{loc >> 8:02x}:{(loc >> 3) & 0x1f:02x}.{loc & 7}"
        out[bus] = props
    return out


def _amd(root: Path, dev: Path, device: str, kfd: dict) -> dict:
    entry = known.match(_read(dev / "product_name"), f"1002:{device}")
    tp = known.throughput(entry)
    props = kfd.get(dev.name, {})
    cus = props["simd_count"] // props["simd_per_cu"] if props.get("simd_per_cu") else None
    clk = props.get("max_engine_clk_fcompute")
    if entry is None and cus and clk:
        # 64 lanes per CU, FMA = 2 FLOPs (no dual-issue / packed FP32 counted).
        tp["fp32_gflops"] = round(cus * 64 * 2 * clk / 1000.0, 1)
        tp["source"] = "computed"
    vram = _int(dev / "mem_info_vram_total")
    used = _int(dev / "mem_info_vram_used")
    gfx = props.get("gfx_target_version")
    name = _read(dev / "product_name") or (entry["model"] if entry else f"AMD GPU 1002:{device}")
    return {"kind": "gpu", "vendor": "AMD", "model": name,
            "memory_bytes": vram or (entry or {}).get("memory_bytes"), "throughput": tp,
            "known": entry["model"] if entry else None, "slug": entry["slug"] if entry else None,
            "tier": entry["tier"] if entry else None,
            "compute_units": cus, "max_clock_mhz": clk,
            "gfx_target_version": gfx,
            "memory_free_bytes": vram - used if vram is not None and used is not None else None,
            "utilization_percent": _int(dev / "gpu_busy_percent"),
            # amdgpu on a separate bus is discrete; APUs sit on bus 00.
            "integrated": (vram or 0) < (1 << 30) and dev.name[5:7] == "00",
            "usable": _driver(dev) == "amdgpu"}


def _intel(dev: Path, device: str) -> dict:
    entry = known.match(None, f"8086:{device}")
    drv = _driver(dev)
    return {"kind": "gpu", "vendor": "Intel",
            "model": entry["model"] if entry else f"Intel GPU 8086:{device}",
            "memory_bytes": (entry or {}).get("memory_bytes"), "throughput": known.throughput(entry),
            "known": entry["model"] if entry else None, "slug": entry["slug"] if entry else None,
            "tier": entry["tier"] if entry else None,
            # Intel's integrated GPUs are always 0000:00:02.0.
            "integrated": dev.name.endswith("00:02.0"),
            "usable": drv in ("i915", "xe")}


def _from_table(kind: str, vendor: str, model: str, pci_id: str) -> dict:
    entry = known.match(model, pci_id)
    return {"kind": kind, "vendor": vendor, "model": entry["model"] if entry else model,
            "memory_bytes": (entry or {}).get("memory_bytes"), "throughput": known.throughput(entry),
            "known": entry["model"] if entry else None, "slug": entry["slug"] if entry else None,
            "tier": entry["tier"] if entry else None, "usable": True}


def probe_pci(root: str | Path = "/", nvidia_seen: bool = False) -> list[dict]:
    """Accelerators on the PCI bus. NVIDIA parts are listed only when NVML saw
    none (driver missing): they appear with usable=False."""
    root = Path(root)
    kfd = _kfd_nodes(root)
    out = []
    for dev in sorted((root / "sys/bus/pci/devices").glob("*")):
        vendor, device = _hex4(dev / "vendor"), _hex4(dev / "device")
        cls = _read(dev / "class") or ""
        if vendor is None or device is None:
            continue
        display, processing = cls.startswith("0x03"), cls.startswith("0x12")
        d = None
        if vendor == "1002" and (display or processing):
            d = _amd(root, dev, device, kfd)
        elif vendor == "8086" and display:
            d = _intel(dev, device)
        elif vendor == "10de" and (display or processing) and not nvidia_seen:
            d = _from_table("gpu", "NVIDIA", f"NVIDIA GPU 10de:{device}", f"10de:{device}")
            d["usable"] = False
            d["why_unusable"] = "NVIDIA driver / NVML not available"
        elif vendor == "1ae0" and device in _TPU_IDS:
            d = _from_table("tpu", "Google", _TPU_IDS[device], f"1ae0:{device}")
        elif vendor == "1d0f" and device in _NEURON_IDS:
            d = _from_table("accelerator", "AWS", _NEURON_IDS[device], f"1d0f:{device}")
        elif vendor in _ACCEL_VENDORS:
            kind, vname = _ACCEL_VENDORS[vendor]
            d = _from_table(kind, vname, f"{vname} {vendor}:{device}", f"{vendor}:{device}")
        elif processing and _driver(dev) not in _NPU_DRIVERS:  # NPUs: see probe_npus
            d = _from_table("accelerator", f"PCI vendor {vendor}", f"accelerator {vendor}:{device}",
                            f"{vendor}:{device}")
        if d is not None:
            d.update(_pci_common(dev, vendor, device))
            out.append(d)
    return out


def probe_npus(root: str | Path = "/", seen_buses: set[str] = frozenset()) -> list[dict]:
    root = Path(root)
    out = []
    for node in sorted((root / "sys/class/accel").glob("accel*")):
        dev = node / "device"
        bus = os.path.basename(os.path.realpath(dev))
        if bus in seen_buses:
            continue  # already listed from the PCI scan (e.g. Habana)
        drv = _driver(dev)
        vendor, model = _NPU_DRIVERS.get(drv or "", (_hex4(dev / "vendor") or "unknown", f"NPU ({drv})"))
        out.append({"kind": "npu", "vendor": vendor, "model": model, "memory_bytes": None,
                    "throughput": known.throughput(None), "accel_node": node.name,
                    "driver": drv, "pci_bus_id": bus if (dev / "vendor").exists() else None,
                    "usable": True})
    return out


def probe_fpgas(root: str | Path = "/") -> list[dict]:
    root = Path(root)
    out = []
    for node in sorted((root / "sys/class/fpga_manager").glob("*")):
        out.append({"kind": "fpga", "vendor": _read(node / "name") or "unknown",
                    "model": _read(node / "name") or node.name, "memory_bytes": None,
                    "throughput": known.throughput(None), "manager": node.name,
                    "state": _read(node / "state"), "usable": True})
    return out


def refresh(devices: list[dict], root: str | Path = "/") -> None:
    """Update AMD utilisation / free VRAM in place."""
    root = Path(root)
    for d in devices:
        if d.get("vendor") == "AMD" and d.get("kind") == "gpu" and d.get("pci_bus_id"):
            dev = root / "sys/bus/pci/devices" / d["pci_bus_id"]
            d["utilization_percent"] = _int(dev / "gpu_busy_percent")
            total, used = _int(dev / "mem_info_vram_total"), _int(dev / "mem_info_vram_used")
            if total is not None and used is not None:
                d["memory_free_bytes"] = total - used


def sample_amd(devices: dict[str, str]) -> dict[str, dict]:
    """Utilisation, VRAM used and power of amdgpu devices ``{unit id: sysfs device dir}``
    now (``gpu_busy_percent``, ``mem_info_vram_used``, hwmon ``power1_average`` or
    ``power1_input`` in microwatts); a device whose counters are gone is left out."""
    out: dict[str, dict] = {}
    for unit, path in devices.items():
        dev = Path(path)
        busy, used = _int(dev / "gpu_busy_percent"), _int(dev / "mem_info_vram_used")
        if busy is None and used is None:
            continue
        power = None
        for hw in sorted((dev / "hwmon").glob("hwmon*")):
            uw = _int(hw / "power1_average")
            uw = _int(hw / "power1_input") if uw is None else uw
            if uw is not None:
                power = uw / 1e6
                break
        out[unit] = {"utilization_percent": busy, "memory_used_bytes": used, "power_w": power}
    return out
