"""GPU passthrough into microVMs: VFIO.

A microVM gets a GPU only as a whole PCI device that the host has bound to
``vfio-pci`` and whose IOMMU group is usable: every device in the group is
bound to ``vfio-pci`` too (or is a PCI bridge, which VFIO tolerates), and the
group's ``/dev/vfio/<group>`` node exists.  Anything else — the device on its
vendor driver, no IOMMU, a group shared with a NIC — means the microVM runtime
offers no GPU, and `summary` says why.

Read from sysfs (``sys/bus/pci/drivers/vfio-pci``, ``sys/kernel/iommu_groups``)
under a configurable root, so tests use a fake tree.
"""

from __future__ import annotations

import os
from pathlib import Path

DISPLAY_OR_ACCEL = ("0x03", "0x12")  # PCI class: display controller, processing accelerator
BRIDGE = "0x0604"


def _read(p: Path) -> str | None:
    try:
        return p.read_text().strip()
    except OSError:
        return None


def _driver(dev: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(dev / "driver"))
    except OSError:
        return None


IORESOURCE_MEM_64 = 0x00100000  # a 64-bit BAR, in sysfs `resource` flags


def bar64_bytes(dev: Path) -> int | None:
    """What the device's 64-bit BARs need (sysfs ``resource``: start end flags per line,
    BARs 0-5 first), or None when unknown."""
    text = _read(dev / "resource")
    if text is None:
        return None
    total = 0
    for line in text.splitlines()[:6]:
        try:
            start, end, flags = (int(x, 16) for x in line.split())
        except ValueError:
            return None
        if end and flags & IORESOURCE_MEM_64:
            total += end - start + 1
    return total


def passthrough_gpus(root: str | Path = "/") -> tuple[list[dict], str | None]:
    """(GPUs a microVM can take, why there are none)."""
    root = Path(root)
    bound = root / "sys/bus/pci/drivers/vfio-pci"
    if not bound.is_dir():
        return [], "no GPU is bound to vfio-pci (the vfio-pci driver is not loaded)"
    groups_dir = root / "sys/kernel/iommu_groups"
    if not groups_dir.is_dir() or not any(groups_dir.iterdir()):
        return [], "the IOMMU is off (no /sys/kernel/iommu_groups): enable intel_iommu=on / amd_iommu=on"
    out, why = [], []
    for link in sorted(bound.iterdir()):
        dev = root / "sys/bus/pci/devices" / link.name
        if not (dev / "vendor").exists():
            continue  # bind/unbind/new_id/... files
        cls = _read(dev / "class") or ""
        if not cls.startswith(DISPLAY_OR_ACCEL):
            continue
        try:
            group = os.path.basename(os.readlink(dev / "iommu_group"))
        except OSError:
            why.append(f"{link.name} has no IOMMU group")
            continue
        members = sorted(p.name for p in (groups_dir / group / "devices").iterdir()) \
            if (groups_dir / group / "devices").is_dir() else []
        blockers = [m for m in members if m != link.name
                    and _driver(root / "sys/bus/pci/devices" / m) not in ("vfio-pci", None)
                    and (_read(root / "sys/bus/pci/devices" / m / "class") or "")[:6] != BRIDGE]
        if blockers:
            why.append(f"{link.name}: IOMMU group {group} also holds {', '.join(blockers)} (not on vfio-pci)")
            continue
        if not (root / "dev/vfio" / group).exists():
            why.append(f"{link.name}: /dev/vfio/{group} is missing")
            continue
        if (need := bar64_bytes(dev) or 0) > MICROVM_MMIO64_BYTES:
            why.append(f"{link.name}: its BARs need {need / 2**30:.2f} GiB, more than the microvm machine's"
                       f" {MICROVM_MMIO64_BYTES >> 30} GiB PCIe window")
            continue
        out.append({"pci_bus_id": link.name, "iommu_group": group, "vendor": _read(dev / "vendor"),
                    "device": _read(dev / "device"), "group_devices": members})
    if not out:
        return [], "; ".join(why) or "no GPU is bound to vfio-pci"
    return out, None


def summary(root: str | Path = "/") -> dict:
    """What `probe` shows under the microvm runtime: {available, reason, devices}."""
    gpus, reason = passthrough_gpus(root)
    return {"available": bool(gpus), "reason": reason, "devices": [g["pci_bus_id"] for g in gpus]}


def annotate(runtimes: dict, root: str | Path = "/") -> dict:
    """Add the microVM's GPU answer to a probe's ``runtimes`` (in place)."""
    if "microvm" in runtimes:
        runtimes["microvm"]["gpu"] = summary(root)
    return runtimes


def qemu_args(gpus: list[dict]) -> list[str]:
    """QEMU arguments that pass ``gpus`` through. Only the GPU function itself is given
    to the guest; its group's other members must merely be on vfio-pci (checked above)."""
    args: list[str] = []
    for g in gpus:
        args += ["-device", f"vfio-pci,host={g['pci_bus_id']}"]
    return args


# The machine stays ``-M microvm`` (direct kernel boot, no firmware, the same guest as every
# other microVM) with its PCIe host bridge switched on: q35 is not needed for VFIO (plain
# microvm has no PCI bus at all). Measured on QEMU 7.2 (`info mtree`, guest RAM 256 MiB to
# 8 GiB): microvm,pcie=on has a 512 MiB 32-bit window and a 256 GiB 64-bit one. A GPU whose
# BARs need more (BAR1 is sized to the card's memory: 256 GiB for a 141 GB card) would need
# q35 and a larger hole: such a GPU is not offered (`passthrough_gpus`).
MICROVM_MACHINE_OPTS = "pcie=on"
MICROVM_MMIO64_BYTES = 256 << 30


def group_node(group: str) -> str:
    """The IOMMU group's character device that QEMU opens (the real one, never under a test root)."""
    return f"/dev/vfio/{group}"


CONTAINER_NODE = "/dev/vfio/vfio"  # the VFIO container QEMU 7.2 opens beside the group


def check_openable(devices: list[dict]) -> str | None:
    """Why QEMU could not take ``devices`` (a group node or the VFIO container missing,
    not readable and writable by this user, or a group held by another process), or None."""
    if not devices:
        return None
    nodes = [(group_node(d["iommu_group"]), d["pci_bus_id"]) for d in devices]
    for node, bus in nodes + [(CONTAINER_NODE, devices[0]["pci_bus_id"])]:
        try:
            fd = os.open(node, os.O_RDWR)  # a group opens once: busy if another VM holds it
        except OSError as exc:
            return (f"cannot open {node} for {bus}: {exc.strerror}"
                    " (the service user needs read-write access to it: see README, GPU section)")
        os.close(fd)
    return None
