"""The real machine: PoCL found through pyopencl, the OpenCL FMA and numpy
benchmarks, a full probe in a subprocess printing valid JSON, the profile
JSON round trip and the dynamic refresh."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from synord import hwprobe
from synord.hwprobe import bench, opencl

REPO = Path(__file__).resolve().parent.parent


def _pocl_or_skip():
    devices, reason, handles = opencl.probe_opencl()
    if not devices:
        pytest.skip(f"no OpenCL device on this machine: {reason}")
    return devices, handles


def test_opencl_finds_pocl():
    devices, _ = _pocl_or_skip()
    if not any(d["platform"] == "Portable Computing Language" for d in devices):
        pytest.skip("PoCL (pocl-opencl-icd) is not installed")
    pocl = next(d for d in devices if d["platform"] == "Portable Computing Language")
    assert pocl["kind"] == "opencl" and pocl["device_type"] == "cpu"
    assert pocl["compute_units"] >= 1 and pocl["memory_bytes"] > 0 and pocl["max_clock_mhz"] > 0
    # Listed once even though PoCL enumerates it per context.
    keys = [(d["model"], d["platform"]) for d in devices]
    assert len(keys) == len(set(keys))


def test_opencl_fma_benchmark_runs():
    _, handles = _pocl_or_skip()
    gflops = bench.opencl_fma_gflops(handles[0], budget_s=0.3)
    assert gflops is not None and gflops > 0


def test_numpy_sgemm_benchmark():
    assert bench.numpy_sgemm_gflops(n=256, repeats=1) > 0


def test_full_probe_in_subprocess_prints_valid_json():
    env = {k: v for k, v in os.environ.items() if k not in ("NVML_STUB_MODE",)}
    p = subprocess.run([sys.executable, "-m", "synord.hwprobe", "--json"], capture_output=True, text=True,
                       timeout=60, cwd=REPO, env=env)
    assert p.returncode == 0, p.stderr
    prof = json.loads(p.stdout)
    assert {"devices", "host", "runtimes", "offerable", "probed_at"} <= set(prof)
    cpu = prof["devices"][0]
    assert cpu["kind"] == "cpu" and cpu["model"]
    for dev in prof["devices"]:
        assert {"kind", "vendor", "model", "memory_bytes", "throughput"} <= set(dev)
        assert {"fp32_gflops", "fp16_gflops", "int8_tops", "bandwidth_gbs", "source",
                "measured_fp32_gflops"} <= set(dev["throughput"])
    host = prof["host"]
    for key in ("hostname", "os", "kernel", "arch", "cpu_model", "physical_cores", "logical_cores",
                "isa", "memory_total_bytes", "memory_available_bytes", "cgroup", "load"):
        assert key in host, key
    assert host["logical_cores"] == os.cpu_count()
    assert {"cpus", "memory_bytes", "gpus", "opencl_devices", "allowed", "why_not"} == set(prof["offerable"])
    # Human output works too.
    p = subprocess.run([sys.executable, "-m", "synord.hwprobe"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 0 and "resource classes: cpu" in p.stdout


def test_probe_bench_puts_measurements_beside_peaks():
    runtimes = {"wasm": {"available": True, "reason": ""}, "microvm": {"available": False, "reason": "no KVM"}}
    prof = hwprobe.probe(bench=True, runtimes=runtimes)
    assert prof.runtimes == runtimes
    cpu = prof.devices[0]["throughput"]
    assert cpu["measured_fp32_gflops"] > 0
    assert cpu["source"] in ("computed", None)  # the peak stays what it was
    for dev in prof.devices_of("opencl"):
        assert dev["throughput"]["measured_fp32_gflops"] is not None


def test_profile_json_round_trip_and_refresh():
    prof = hwprobe.probe(limits=hwprobe.ContributorLimits(cpu_share=0.5))
    again = hwprobe.CapabilityProfile.from_json(json.loads(json.dumps(prof.to_json())))
    assert again.to_json() == prof.to_json()
    fresh = hwprobe.refresh_dynamic(again)
    assert fresh.devices == prof.devices or len(fresh.devices) == len(prof.devices)
    assert fresh.host["refreshed_at"] >= prof.probed_at
    assert fresh.probed_at == prof.probed_at
    assert fresh.limits["cpu_share"] == 0.5
    assert fresh.offerable["cpus"] <= prof.host["effective_cpus"] * 0.5
    assert "refreshed_at" not in prof.host  # the original is left alone


def test_from_json_rejects_garbage():
    with pytest.raises(ValueError, match="devices"):
        hwprobe.CapabilityProfile.from_json({"host": {}})


def _cl(platform, model, bus=None, cus=8, dtype="gpu"):
    return {"platform": platform, "model": model, "pci_bus_id": bus, "vendor_id": 0x10DE,
            "compute_units": cus, "device_type": dtype}


def test_opencl_dedupe_prefers_the_vendor_platform():
    entries = [_cl("rusticl", "NVIDIA H100", "0000:18:00.0"),
               _cl("NVIDIA CUDA", "NVIDIA H100", "0000:18:00.0"),
               _cl("NVIDIA CUDA", "NVIDIA H100", "0000:19:00.0"),  # a second, identical card
               _cl("Portable Computing Language", "pthread-haswell-Intel Core i7", cus=2, dtype="cpu"),
               _cl("Intel(R) OpenCL", "Intel(R) Core(TM) i7", cus=2, dtype="cpu")]
    assert opencl.dedupe(entries) == [1, 2, 3, 4]
    # Without a PCI address, same name/units/type on two platforms is one device.
    same = [_cl("Portable Computing Language", "gfx1100", cus=48), _cl("AMD Accelerated Parallel Processing", "gfx1100", cus=48)]
    assert opencl.dedupe(same) == [1]
