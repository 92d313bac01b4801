"""probe(): the whole machine in one CapabilityProfile; refresh_dynamic():
the few fields that change (load, free memory, GPU use) every few seconds."""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from pathlib import Path

from . import host as _host
from . import cgroup, nvidia, opencl, policy, signals as _signals, sysfs
from .profile import CapabilityProfile


def _is_real_root(root: Path) -> bool:
    return os.path.realpath(root) == "/"


def probe(bench: bool = False, sysfs_root: str | Path = "/", runtimes: dict | None = None,
          limits: policy.ContributorLimits | None = None) -> CapabilityProfile:
    """Probe this machine. A sysfs_root other than "/" is a fake machine
    (tests): only files under it are read; NVML and OpenCL, which talk to
    real drivers, are skipped."""
    root = Path(sysfs_root)
    limits = limits or policy.ContributorLimits()
    host, cpu = _host.probe_host(root)
    devices = [cpu]
    notes = {}
    cl_handles = []
    if _is_real_root(root):
        gpus, notes["nvidia"] = nvidia.probe_nvidia()
        devices += gpus
    pci = sysfs.probe_pci(root, nvidia_seen=any(d["vendor"] == "NVIDIA" for d in devices[1:]))
    devices += pci
    devices += sysfs.probe_npus(root, {d["pci_bus_id"] for d in pci if d.get("pci_bus_id")})
    devices += sysfs.probe_fpgas(root)
    if _is_real_root(root):
        cl_devs, notes["opencl"], cl_handles = opencl.probe_opencl()
        for d in cl_devs:
            if d["device_type"] == "cpu" and d["throughput"]["fp32_gflops"] is None:
                # PoCL and friends run on the host CPU: same silicon, same peak.
                d["throughput"].update(fp32_gflops=cpu["throughput"]["fp32_gflops"],
                                       source=cpu["throughput"]["source"])
        devices += cl_devs
    host["probe_notes"] = {k: v for k, v in notes.items() if v}
    if bench:
        _run_bench(cpu, [d for d in devices if d["kind"] == "opencl"], cl_handles)
    profile = CapabilityProfile(devices=devices, host=host, runtimes=dict(runtimes or {}),
                                limits=limits.to_json(), sysfs_root=str(root))
    return _with_offer(profile, limits)


def _run_bench(cpu: dict, cl_devs: list[dict], handles: list) -> None:
    from . import bench as _bench  # numpy: only paid for when benchmarking
    cpu["throughput"]["measured_fp32_gflops"] = _bench.numpy_sgemm_gflops()
    for dev, handle in zip(cl_devs, handles):
        dev["throughput"]["measured_fp32_gflops"] = _bench.opencl_fma_gflops(handle)


def _with_offer(profile: CapabilityProfile, limits: policy.ContributorLimits) -> CapabilityProfile:
    sig = _signals.read_signals(profile.sysfs_root)
    profile.signals = sig.to_json()
    profile.offerable = policy.offerable(profile, limits, sig)
    return profile


def refresh_dynamic(profile: CapabilityProfile) -> CapabilityProfile:
    """A new profile with load, free memory, GPU utilisation, signals and
    offerable capacity brought up to date; the rest is copied."""
    root = Path(profile.sysfs_root)
    new = dataclasses.replace(profile, devices=copy.deepcopy(profile.devices),
                              host=copy.deepcopy(profile.host))
    new.host["load"] = _host.load(root)
    new.host["memory_available_bytes"] = _host.memory_available(root)
    new.host["cgroup"] = cgroup.read_limits(root)  # memory usage moves; limits can be changed live
    if _is_real_root(root):
        nvidia.refresh(new.devices)
    sysfs.refresh(new.devices, root)
    limits = policy.ContributorLimits.from_json(profile.limits) if profile.limits else policy.ContributorLimits()
    new.probed_at = profile.probed_at
    new.host["refreshed_at"] = time.time()
    return _with_offer(new, limits)
