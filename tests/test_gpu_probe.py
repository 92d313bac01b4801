"""GPUs as units: the NVML stub with two GPUs and with MIG, AMD/Intel render
nodes from a fake sysfs, and VFIO passthrough detection for microVMs."""

from __future__ import annotations

import os
from pathlib import Path

from synord.hwprobe import gpu_units
from synord.runtimes import vfio

from test_hwprobe_nvml import run, stub_dirs  # noqa: F401 (fixture)
from test_hwprobe_sysfs import base_machine, pci, write

UNITS = ("import json, synord.hwprobe.gpu_units as u; from synord import hwprobe; p = hwprobe.probe(); "
         "print(json.dumps({'units': u.gpu_units(p.devices), 'classes': hwprobe.resource_classes(p)}))")


def test_two_gpus_are_two_units_by_uuid(stub_dirs):  # noqa: F811
    out = run(UNITS, stub_dirs["current"], "two")
    assert [(u["id"], u["class"], u["minor"], u["cdi"].split("=")[0]) for u in out["units"]] == [
        ("GPU-5f2c7c1e-0000-1111-2222-333344445555", "h100", 0, "nvidia.com/gpu"),
        ("GPU-5f2c7c1e-0000-1111-2222-666677778888", "h100", 1, "nvidia.com/gpu")]
    assert out["classes"].count("gpu.h100") == 1


def test_mig_instances_are_units_and_classes_of_their_own(stub_dirs):  # noqa: F811
    out = run(UNITS, stub_dirs["current"], "mig")
    assert [(u["id"], u["class"], u["memory_bytes"], u["gi"], u["ci"]) for u in out["units"]] == [
        ("MIG-aaaa0000-0000-1111-2222-333344445555", "h100-1g-10gb", 10200547328, 7, 0),
        ("MIG-bbbb0000-0000-1111-2222-333344445555", "h100-1g-10gb", 10200547328, 8, 0)]
    assert "gpu.h100-1g-10gb" in out["classes"] and "gpu.h100" not in out["classes"]


def test_a_gpu_without_uuid_cannot_be_allocated(stub_dirs):  # noqa: F811
    assert run(UNITS, stub_dirs["current"], "notsupported")["units"] == []


def test_amd_and_intel_units_from_sysfs(tmp_path):
    root = base_machine(tmp_path)
    amd = pci(root, "0000:c1:00.0", "1002", "74a1", "0x038000", "amdgpu",
              mem_info_vram_total=str(192 * 2**30), mem_info_vram_used="0", gpu_busy_percent="0")
    write(amd / "drm/renderD128/dev", "226:128")
    intel = pci(root, "0000:03:00.0", "8086", "56a0", "0x030000", "i915")
    write(intel / "drm/renderD129/dev", "226:129")
    pci(root, "0000:04:00.0", "8086", "56a0", "0x030000", "i915")  # no render node: not offered
    from synord.hwprobe import sysfs
    units = {u["id"]: u for u in gpu_units.gpu_units(sysfs.probe_pci(root), root)}
    assert set(units) == {"0000:c1:00.0", "0000:03:00.0"}
    assert units["0000:c1:00.0"]["nodes"] == ["/dev/kfd", "/dev/dri/renderD128"]
    assert units["0000:c1:00.0"]["cdi"] == "amd.com/gpu=0000-c1-00.0" and units["0000:c1:00.0"]["class"] == "mi300x"
    assert units["0000:03:00.0"]["nodes"] == ["/dev/dri/renderD129"]


def _vfio_tree(tmp_path: Path, group_peer_driver: str | None = "vfio-pci") -> Path:
    root = tmp_path / "root"
    gpu = pci(root, "0000:01:00.0", "10de", "2330", "0x030200", "vfio-pci")
    audio = pci(root, "0000:01:00.1", "10de", "22a3", "0x040300", group_peer_driver)
    bridge = pci(root, "0000:00:01.0", "8086", "1234", "0x060400", "pcieport")
    groups = root / "sys/kernel/iommu_groups/13/devices"
    groups.mkdir(parents=True)
    for d in (gpu, audio, bridge):
        os.symlink(d, groups / d.name)
        os.symlink(groups.parent, d / "iommu_group")
    drv = root / "sys/bus/pci/drivers/vfio-pci"
    os.symlink(gpu, drv / gpu.name)
    (root / "dev/vfio").mkdir(parents=True)
    (root / "dev/vfio/13").write_text("")
    return root


def test_vfio_gpu_with_a_clean_iommu_group_is_offered(tmp_path):
    root = _vfio_tree(tmp_path)
    gpus, why = vfio.passthrough_gpus(root)
    assert why is None and [g["pci_bus_id"] for g in gpus] == ["0000:01:00.0"] and gpus[0]["iommu_group"] == "13"
    assert vfio.qemu_args(gpus) == ["-device", "vfio-pci,host=0000:01:00.0"]
    assert vfio.summary(root) == {"available": True, "reason": None, "devices": ["0000:01:00.0"]}


def test_vfio_says_why_not(tmp_path):
    root = _vfio_tree(tmp_path, group_peer_driver="snd_hda_intel")
    s = vfio.summary(root)
    assert not s["available"] and "IOMMU group 13 also holds 0000:01:00.1" in s["reason"]
    clean = _vfio_tree(tmp_path / "nodev")
    (clean / "dev/vfio/13").unlink()
    assert "/dev/vfio/13 is missing" in vfio.summary(clean)["reason"]
    empty = tmp_path / "bare"
    empty.mkdir()
    assert "not loaded" in vfio.summary(empty)["reason"]
    (empty / "sys/bus/pci/drivers/vfio-pci").mkdir(parents=True)
    assert "IOMMU is off" in vfio.summary(empty)["reason"]
