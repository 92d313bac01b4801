"""Accelerators from fake sysfs trees, one per vendor, and the full probe()
of such a fake machine (resource classes, offerable capacity)."""

import os
from pathlib import Path

import pytest

from synord import hwprobe
from synord.hwprobe import sysfs

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16 amx_tile amx_bf16 amx_int8
cpu MHz\t\t: 2000.000
physical id\t: 0
core id\t\t: 0

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16 amx_tile amx_bf16 amx_int8
cpu MHz\t\t: 2000.000
physical id\t: 0
core id\t\t: 1
"""
MEMINFO = "MemTotal:       16384000 kB\nMemFree:         8000000 kB\nMemAvailable:   12000000 kB\n"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def pci(root: Path, bus: str, vendor: str, device: str, cls: str, driver: str | None = None,
        **files: str) -> Path:
    d = root / "sys/bus/pci/devices" / bus
    write(d / "vendor", f"0x{vendor}\n")
    write(d / "device", f"0x{device}\n")
    write(d / "class", f"{cls}\n")
    write(d / "numa_node", "0\n")
    if driver:
        drv = root / "sys/bus/pci/drivers" / driver
        drv.mkdir(parents=True, exist_ok=True)
        os.symlink(drv, d / "driver")
    for name, text in files.items():
        write(d / name, text + "\n")
    return d


def base_machine(root: Path) -> Path:
    write(root / "proc/cpuinfo", CPUINFO)
    write(root / "proc/meminfo", MEMINFO)
    write(root / "proc/loadavg", "0.50 0.40 0.30 1/100 1234\n")
    write(root / "proc/stat", "cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 50 0 50 400 0 0 0 0 0 0\ncpu1 50 0 50 400 0 0 0 0 0 0\n")
    write(root / "proc/sys/kernel/hostname", "fakehost\n")
    return root


@pytest.fixture
def amd_root(tmp_path):
    root = base_machine(tmp_path)
    pci(root, "0000:c1:00.0", "1002", "74a1", "0x038000", "amdgpu",
        mem_info_vram_total=str(192 * 2**30), mem_info_vram_used=str(2**30), gpu_busy_percent="12")
    # An unknown AMD part: throughput computed from the KFD topology.
    pci(root, "0000:c2:00.0", "1002", "7480", "0x030000", "amdgpu",
        mem_info_vram_total=str(8 * 2**30), mem_info_vram_used="0", gpu_busy_percent="0")
    nodes = root / "sys/class/kfd/kfd/topology/nodes"
    write(nodes / "0/properties", "cpu_cores_count 2\nsimd_count 0\n")
    loc2 = (0xc2 << 8) | (0 << 3) | 0
    write(nodes / "2/properties", f"simd_count 64\nsimd_per_cu 2\nmax_engine_clk_fcompute 2500\n"
                                  f"location_id {loc2}\ndomain 0\ngfx_target_version 110003\n")
    return root


def test_amd_gpus_from_amdgpu_and_kfd(amd_root):
    devs = {d["pci_bus_id"]: d for d in sysfs.probe_pci(amd_root)}
    mi = devs["0000:c1:00.0"]
    assert (mi["kind"], mi["vendor"], mi["known"], mi["slug"]) == ("gpu", "AMD", "Instinct MI300X", "mi300x")
    assert mi["memory_bytes"] == 192 * 2**30 and mi["memory_free_bytes"] == 191 * 2**30
    assert mi["throughput"]["source"] == "table" and mi["throughput"]["fp32_gflops"] == 163400
    assert mi["utilization_percent"] == 12 and mi["usable"] and mi["driver"] == "amdgpu"
    other = devs["0000:c2:00.0"]
    assert other["compute_units"] == 32 and other["known"] is None
    assert other["throughput"] == {**other["throughput"], "fp32_gflops": 32 * 64 * 2 * 2.5, "source": "computed"}


def test_amd_refresh_reads_new_utilisation(amd_root):
    devs = sysfs.probe_pci(amd_root)
    write(amd_root / "sys/bus/pci/devices/0000:c1:00.0/gpu_busy_percent", "88\n")
    sysfs.refresh(devs, amd_root)
    assert devs[0]["utilization_percent"] == 88


def test_intel_discrete_and_integrated(tmp_path):
    root = base_machine(tmp_path)
    pci(root, "0000:00:02.0", "8086", "a7a0", "0x030000", "i915")
    pci(root, "0000:03:00.0", "8086", "56a0", "0x030000", "xe")
    devs = {d["pci_bus_id"]: d for d in sysfs.probe_pci(root)}
    assert devs["0000:00:02.0"]["integrated"] is True
    arc = devs["0000:03:00.0"]
    assert (arc["model"], arc["tier"], arc["integrated"], arc["usable"]) == ("Arc A770", "consumer", False, True)
    profile = hwprobe.probe(sysfs_root=root)
    # The iGPU is not a market GPU; the Arc is a consumer card.
    assert hwprobe.resource_classes(profile) == ["cpu", "gpu.consumer"]
    assert profile.offerable["gpus"] == 1


@pytest.mark.parametrize("device,model,slug", [("005e", "TPU v4", "v4"), ("0063", "TPU v5e", "v5e"),
                                               ("0062", "TPU v5p", "v5p"), ("006f", "TPU v6e", "v6e")])
def test_google_tpus(tmp_path, device, model, slug):
    root = base_machine(tmp_path)
    pci(root, "0000:00:04.0", "1ae0", device, "0x120000", "vfio-pci")
    pci(root, "0000:00:05.0", "1ae0", "0042", "0x020000", "gve")  # gVNIC: same vendor, not a TPU
    devs = sysfs.probe_pci(root)
    assert len(devs) == 1
    assert (devs[0]["kind"], devs[0]["model"], devs[0]["vendor"]) == ("tpu", model, "Google")
    assert devs[0]["throughput"]["int8_tops"] > 0
    assert hwprobe.resource_classes(hwprobe.probe(sysfs_root=root)) == ["cpu", f"tpu.{slug}"]


def test_neuron_tenstorrent_habana_groq_and_generic(tmp_path):
    root = base_machine(tmp_path)
    pci(root, "0000:10:1e.0", "1d0f", "7264", "0x088000", "neuron")
    pci(root, "0000:10:1f.0", "1d0f", "ec20", "0x020000", "ena")     # an ENA NIC: ignored
    pci(root, "0000:11:00.0", "1e52", "401e", "0x120000", "tenstorrent")
    hab = pci(root, "0000:12:00.0", "1da3", "1020", "0x120000", "habanalabs")
    pci(root, "0000:13:00.0", "1de0", "0000", "0x120000", "groq")
    pci(root, "0000:14:00.0", "abcd", "0001", "0x120000")
    # habanalabs also registers an accel node: it must not be listed twice.
    accel = root / "sys/class/accel/accel0"
    accel.mkdir(parents=True)
    os.symlink(hab, accel / "device")
    profile = hwprobe.probe(sysfs_root=root)
    models = [(d["kind"], d["vendor"], d["model"]) for d in profile.devices if d["kind"] != "cpu"]
    assert models == [("accelerator", "AWS", "Inferentia2"), ("accelerator", "Tenstorrent", "Wormhole n300"),
                      ("accelerator", "Habana", "Gaudi2"), ("accelerator", "Groq", "GroqChip LPU"),
                      ("accelerator", "PCI vendor abcd", "accelerator abcd:0001")]
    assert hwprobe.resource_classes(profile) == ["cpu", "accelerator.inferentia2", "accelerator.wormhole",
                                                 "accelerator.gaudi2", "accelerator.groq-lpu", "accelerator"]


def test_npu_from_accel_class_and_fpga(tmp_path):
    root = base_machine(tmp_path)
    npu = pci(root, "0000:00:0b.0", "8086", "7d1d", "0x120000", "intel_vpu")
    accel = root / "sys/class/accel/accel0"
    accel.mkdir(parents=True)
    os.symlink(npu, accel / "device")
    write(root / "sys/class/fpga_manager/fpga0/name", "Xilinx ZynqMP FPGA Manager")
    write(root / "sys/class/fpga_manager/fpga0/state", "operating")
    profile = hwprobe.probe(sysfs_root=root)
    kinds = {d["kind"]: d for d in profile.devices}
    # The PCI scan sees a processing accelerator, the accel class names it.
    assert kinds["npu"]["model"] == "Intel NPU" and kinds["npu"]["driver"] == "intel_vpu"
    assert kinds["fpga"]["state"] == "operating" and kinds["fpga"]["vendor"] == "Xilinx ZynqMP FPGA Manager"
    assert {"npu", "fpga"} <= set(hwprobe.resource_classes(profile))


def test_nvidia_without_driver_is_listed_unusable(tmp_path):
    root = base_machine(tmp_path)
    pci(root, "0000:18:00.0", "10de", "2330", "0x030200")  # no driver bound
    profile = hwprobe.probe(sysfs_root=root)
    gpu = profile.devices_of("gpu")[0]
    assert gpu["usable"] is False and gpu["known"] == "H100 SXM5 80GB"
    assert profile.offerable["gpus"] == 0
    assert hwprobe.resource_classes(profile) == ["cpu"]


def test_empty_machine_has_only_the_cpu(tmp_path):
    profile = hwprobe.probe(sysfs_root=base_machine(tmp_path))
    assert [d["kind"] for d in profile.devices] == ["cpu"]
    cpu = profile.devices[0]
    assert cpu["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"amx_bf16", "amx_int8", "avx512f", "avx2"} <= set(cpu["isa"])
    # 2 cores x 2 GHz x 64 FP32 FLOPs/cycle (two AVX-512 FMA ports).
    assert cpu["throughput"]["fp32_gflops"] == 256.0 and cpu["throughput"]["source"] == "computed"
    assert profile.host["hostname"] == "fakehost"
    assert profile.host["memory_total_bytes"] == 16384000 * 1024
