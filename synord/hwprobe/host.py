"""The host and its CPU, read from /proc and /sys under a configurable root
(so tests can hand in a fake machine)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from . import cgroup, known

# ISA features worth advertising (x86 `flags`, arm64 `Features`, riscv `isa`).
_ISA_PREFIXES = ("avx512", "amx")
_ISA_EXACT = {"sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "sha_ni", "aes",
              "asimd", "asimddp", "asimdhp", "sve", "sve2", "sme", "i8mm", "bf16",
              "rvv", "v"}


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _cpuinfo(root: Path) -> list[dict[str, str]]:
    blocks, cur = [], {}
    for line in (_read(root / "proc/cpuinfo") or "").splitlines():
        if not line.strip():
            if cur:
                blocks.append(cur)
            cur = {}
            continue
        key, _, value = line.partition(":")
        cur[key.strip().lower()] = value.strip()
    if cur:
        blocks.append(cur)
    return blocks


def _isa_flags(blocks: list[dict[str, str]]) -> list[str]:
    raw: set[str] = set()
    for b in blocks[:1] or [{}]:
        raw.update(b.get("flags", "").split())
        raw.update(b.get("features", "").split())
        isa = b.get("isa", "")
        if isa.startswith("rv"):
            # riscv: "rv64imafdcv_zicsr..." -> the single-letter extensions.
            base = isa.split("_")[0][4:]
            if "v" in base:
                raw.add("rvv")
    return sorted(f for f in raw if f in _ISA_EXACT or f.startswith(_ISA_PREFIXES))


def _cores(root: Path, blocks: list[dict[str, str]]) -> tuple[int, int]:
    logical = sum(1 for b in blocks if "processor" in b) or os.cpu_count() or 1
    pairs = {(b.get("physical id"), b.get("core id")) for b in blocks if "core id" in b}
    if pairs:
        return len(pairs), logical
    # arm64 and others: sysfs topology.
    topo = set()
    for d in (root / "sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        core, pkg = _read(d / "core_id"), _read(d / "physical_package_id")
        if core is not None:
            topo.add((pkg, core.strip()))
    return (len(topo) or logical), logical


def _meminfo(root: Path) -> dict[str, int]:
    out = {}
    for line in (_read(root / "proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _os_name(root: Path) -> str:
    for line in (_read(root / "etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return platform.system()


def _cpu_mhz(root: Path, blocks: list[dict[str, str]]) -> float | None:
    # cpufreq max first (turbo-less VMs report 0 there), then cpuinfo MHz.
    text = _read(root / "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if text and text.strip().isdigit() and int(text) > 0:
        return int(text) / 1000.0
    for b in blocks[:1]:
        try:
            return float(b.get("cpu mhz", "")) or None
        except ValueError:
            return None
    return None


def _fp32_flops_per_cycle(flags: list[str], vendor: str) -> int:
    """Single-precision FLOPs per core per cycle (FMA = 2), a peak estimate."""
    f = set(flags)
    if "avx512f" in f:
        # Zen 4/5 execute 512-bit ops on 256-bit halves; Intel has two 512-bit FMA ports.
        return 32 if "amd" in vendor.lower() else 64
    if "avx2" in f and "fma" in f:
        return 32
    if "sve" in f or "asimd" in f:
        return 16
    return 8


def load(root: Path) -> dict:
    text = _read(root / "proc/loadavg")
    if not text:
        return {"load1": None, "load5": None, "load15": None}
    parts = text.split()
    return {"load1": float(parts[0]), "load5": float(parts[1]), "load15": float(parts[2])}


def memory_available(root: Path) -> int | None:
    mi = _meminfo(root)
    return mi.get("MemAvailable", mi.get("MemFree"))


def probe_host(root: str | Path = "/") -> tuple[dict, dict]:
    """Returns (host dict, cpu device dict)."""
    root = Path(root)
    blocks = _cpuinfo(root)
    first = blocks[0] if blocks else {}
    model = (first.get("model name") or first.get("cpu model") or first.get("hardware")
             or first.get("uarch") or platform.processor() or "unknown CPU")
    vendor = first.get("vendor_id") or first.get("cpu implementer") or first.get("mvendorid") or ""
    physical, logical = _cores(root, blocks)
    flags = _isa_flags(blocks)
    mem = _meminfo(root)
    limits = cgroup.read_limits(root)
    effective = float(logical)
    for lim in (limits["cpu_quota_cores"], limits["cpuset_cpus"]):
        if lim is not None:
            effective = min(effective, float(lim))
    mem_total = mem.get("MemTotal")
    mem_effective = mem_total
    if limits["memory_limit_bytes"] is not None and mem_total:
        mem_effective = min(mem_total, limits["memory_limit_bytes"])
    uname = os.uname()
    host = {
        "hostname": (_read(root / "proc/sys/kernel/hostname") or uname.nodename).strip(),
        "os": _os_name(root),
        "kernel": (_read(root / "proc/sys/kernel/osrelease") or uname.release).strip(),
        "arch": platform.machine(),
        "cpu_model": model,
        "cpu_vendor": vendor,
        "physical_cores": physical,
        "logical_cores": logical,
        "effective_cpus": effective,
        "isa": flags,
        "memory_total_bytes": mem_total,
        "memory_available_bytes": memory_available(root),
        "memory_effective_bytes": mem_effective,
        "cgroup": limits,
        "load": load(root),
    }
    mhz = _cpu_mhz(root, blocks)
    tp = known.throughput(None)
    if mhz:
        # Peak over the cores we may actually use (cgroup limits included).
        cores = min(physical, effective)
        tp["fp32_gflops"] = round(cores * mhz / 1000.0 * _fp32_flops_per_cycle(flags, vendor), 1)
        tp["source"] = "computed"
    cpu = {"kind": "cpu", "vendor": vendor, "model": model, "memory_bytes": mem_effective,
           "throughput": tp, "physical_cores": physical, "logical_cores": logical,
           "effective_cpus": effective, "max_mhz": mhz, "isa": flags}
    return host, cpu
