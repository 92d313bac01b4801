"""GPUs bound to vfio-pci, passed through to microVMs — without the hardware.

A fake sysfs tree (tests/test_gpu_probe.py's) holds an H100 on vfio-pci in a clean
IOMMU group 13. Units, allocation and asks are checked without daemons; the argv the
microVM runtime builds is handed to the real QEMU, which accepts the machine and the
device and fails only when it opens the (absent) host device; and a GPU microVM job
crosses a mesh of real daemons: the agreement names the PCI unit, the task fails
cleanly because /dev/vfio/13 cannot be opened here, and the device is free again.
Last, the guest boots on the very machine a GPU task gets, with an emulated PCI device
where the GPU would be, and enumerates it. Nothing here boots a guest with a real GPU:
that needs an IOMMU and a device bound to vfio-pci."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from synord.gpu_devices import GpuAllocator, GpuNode, offer_classes
from synord.gpu_request import gpu_request
from synord.hwprobe.gpu_units import vfio_units
from synord.market.matching import match
from synord.market.pricing import PricingPolicy, derive_asks
from synord.market.reservations import InsufficientCapacity
from synord.runtimes import vfio
from synord.runtimes.base import Limits, SpecError, TaskSpec, Unavailable
from synord.runtimes.microvm import Machine, MicroVMRuntime
from synord.store import Store

from test_gpu_market import units as cdi_units
from test_gpu_probe import _vfio_tree
from test_market_book import NOW, bid

BUS = "0000:01:00.0"


def _units(tmp_path):
    return vfio_units(vfio.passthrough_gpus(_vfio_tree(tmp_path))[0])


def test_a_vfio_gpu_is_a_microvm_unit_by_pci_bus_id(tmp_path):
    (u,) = _units(tmp_path)
    assert (u["id"], u["class"], u["vendor"], u["memory_bytes"]) == (BUS, "h100", "nvidia", 80 << 30)
    assert u["runtimes"] == ["microvm"] and u["vfio"] == {"pci_bus_id": BUS, "iommu_group": "13"}
    assert u["compute_capability"] is None  # NVML cannot see it: no CUDA capability is claimed


def _resource(bar1_bytes: int) -> str:
    """sysfs `resource` of an H100-like card: BAR0 16 MiB (32-bit), BAR1 and BAR3 64-bit prefetchable."""
    rows = [(0xd8000000, 16 << 20, 0x40200), (0, 0, 0), (0xc000000000, bar1_bytes, 0x14220c), (0, 0, 0),
            (0xe000000000, 32 << 20, 0x14220c), (0, 0, 0), (0, 0, 0)]
    return "".join(f"0x{s:016x} 0x{(s + n - 1) if n else 0:016x} 0x{f:016x}\n" for s, n, f in rows)


def test_a_gpu_whose_bars_exceed_the_microvm_window_is_not_offered(tmp_path):
    root = _vfio_tree(tmp_path)
    res = root / "sys/bus/pci/devices" / BUS / "resource"
    res.write_text(_resource(128 << 30))  # an 80 GB card: BAR1 128 GiB, fits the 256 GiB window
    assert [g["pci_bus_id"] for g in vfio.passthrough_gpus(root)[0]] == [BUS]
    res.write_text(_resource(256 << 30))  # a 141 GB card: BAR1 256 GiB + BAR3 does not
    gpus, why = vfio.passthrough_gpus(root)
    assert gpus == [] and "its BARs need 256.03 GiB, more than the microvm machine's 256 GiB" in why


def test_container_and_microvm_units_are_allocated_apart(tmp_path):
    both = cdi_units()[:1] + _units(tmp_path)  # GPU-a (CDI, container) and the VFIO H100
    alloc = GpuAllocator(Store(tmp_path / "state.db"), lambda: both)
    assert alloc.reserve("c1/n1", 1, "h100", runtime="microvm") == (BUS,)
    with pytest.raises(InsufficientCapacity):
        alloc.reserve("c2/n2", 1, "h100", runtime="microvm")  # one device never in two tasks
    assert alloc.reserve("c3/n3", 1, "h100", runtime="container") == ("GPU-a",)
    assert alloc.task_ended("c1/n1") == 1 and alloc.reserve("c2/n2", 1, runtime="microvm") == (BUS,)


def test_vfio_units_get_an_ask_of_their_own_that_only_microvm_bids_match(tmp_path):
    both = cdi_units()[:1] + _units(tmp_path)
    classes = offer_classes(both, len(both))
    asks = derive_asks({"cpus": 4.0, "memory_bytes": 16 << 30, "runtimes": ["container", "microvm", "wasm"],
                        "gpu_classes": classes}, PricingPolicy(), now=NOW)
    by_id = {a.id: a for a in asks if a.resource_class == "gpu"}
    assert set(by_id) == {"gpu:h100", "gpu:h100:microvm"}
    assert by_id["gpu:h100"].runtimes == ("container",) and by_id["gpu:h100:microvm"].runtimes == ("microvm",)
    asks = [dataclasses.replace(a, peer="P1") for a in asks]
    for runtime, want in (("microvm", "gpu:h100:microvm"), ("container", "gpu:h100")):
        b = bid(resource_class="gpu", gpus=1, gpu_class="h100", runtime=runtime, memory=4 << 30, max_price=1e6)
        res = match(b, asks, now=NOW)
        assert [c.ask.id for c in res.candidates] == [want]


def test_task_devices_for_a_microvm_are_the_vfio_groups(tmp_path):
    node = GpuNode(Store(tmp_path / "state.db"), lambda: [], [], vfio_units=lambda: _units(tmp_path / "t"))
    assert node.task_devices((BUS,), "microvm") == {"vfio": [{"pci_bus_id": BUS, "iommu_group": "13"}]}
    with pytest.raises(ValueError, match="cannot be given to a container"):
        node.task_devices((BUS,), "container")


def test_a_microvm_may_ask_for_a_gpu():
    assert gpu_request({"gpus": 1, "gpu_class": "h100"}, "microvm") == {
        "gpus": 1, "gpu_class": "h100", "gpu_memory": None, "cuda": None}


def _machine(gpus):
    rt = MicroVMRuntime()
    if not rt.kernel.is_file() or not shutil.which("qemu-system-x86_64"):
        pytest.skip("no guest kernel or no qemu-system-x86_64")
    return Machine(vmm="qemu", binary=shutil.which("qemu-system-x86_64"), accel="tcg", kernel=rt.kernel,
                   initramfs=rt.base_cpio, mem_mib=4096, smp=1, cmdline="console=ttyS0", vfio=gpus)


def test_qemu_takes_the_argv_and_fails_only_at_the_host_device(tmp_path):
    gpus = [{"pci_bus_id": BUS, "iommu_group": "13"}]
    argv = _machine(gpus).qemu_argv(None)
    assert argv[argv.index("-M") + 1] == "microvm,pcie=on"
    assert argv[argv.index("-device") + 1] == f"vfio-pci,host={BUS}"
    assert _machine([]).qemu_argv(None)[2] == "microvm"  # no GPU: the machine is unchanged
    # The real QEMU parses the machine and the device and fails opening the host device
    # (none here); plain `-M microvm` would have "No 'PCI' bus" for it.
    res = subprocess.run(argv + ["-S"], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert f"vfio-pci,host={BUS}" in res.stderr and "no such host device" in res.stderr, res.stderr
    plain = [a if a != "microvm,pcie=on" else "microvm" for a in argv]
    res = subprocess.run(plain + ["-S"], capture_output=True, text=True, timeout=60)
    assert "No 'PCI' bus found for device 'vfio-pci'" in res.stderr, res.stderr


@pytest.mark.parametrize("devices,memory,err,msg", [
    ({"vfio": [{"pci_bus_id": "0000:01:00.0,x-evil=on", "iommu_group": "13"}]}, 4 << 30, SpecError, "pci_bus_id"),
    ({"cdi": {}}, 4 << 30, SpecError, "only by VFIO"),
    ({"vfio": [{"pci_bus_id": BUS, "iommu_group": "913"}]}, 4 << 30, Unavailable, "cannot open /dev/vfio/913"),
])
def test_the_runtime_refuses_what_it_cannot_pass_through(tmp_path, devices, memory, err, msg):
    if Path("/dev/vfio/913").exists():
        pytest.skip("this host has an IOMMU group 913")
    rt = MicroVMRuntime()
    if not rt.available().available:
        pytest.skip(f"microvm unavailable: {rt.available().reason}")
    spec = TaskSpec(kind="microvm", artifact=tmp_path / "none.tar", devices=devices,
                    limits=Limits(memory_bytes=memory))
    with pytest.raises(err, match=msg):
        trio.run(rt.prepare, spec)


# ---- the mesh: real daemons, the provider's sysfs is the fake tree ---------------------------------

def test_gpu_microvm_job_gets_the_pci_unit_and_fails_cleanly_without_the_device(tmp_path):
    from daemons import DaemonCluster, wait_for
    from jobs_helpers import BUSYBOX_TAR, CONSUMER_ONLY, ensure_assets, submit, wait_job
    av = MicroVMRuntime().available()
    if not av.available:
        pytest.skip(f"microvm unavailable: {av.reason}")
    if Path("/dev/vfio/13").exists():
        pytest.skip("this host has a real IOMMU group 13")
    ensure_assets()
    root = _vfio_tree(tmp_path)
    prov_conf = (f"[gpu]\nsysfs_root = \"{root}\"\ncdi_dirs = []\n[runtimes]\nenabled = [\"microvm\"]\n"
                 "[contributor]\ncpu_share = 1.0\n")
    with DaemonCluster(tmp_path / "homes") as cluster:
        consumer = cluster.start("consumer", config=CONSUMER_ONLY + "[jobs]\nplacement_timeout_s = 8.0\n"
                                 "[market]\nmax_price = 20.0\n")
        prov = cluster.start("vfio", bootstrap=consumer.p2p_addrs(), config=prov_conf)
        probe = prov.get("/v1/probe")["runtimes"]["microvm"]["gpu"]
        assert probe == {"available": True, "reason": None, "devices": [BUS]}
        (unit,) = prov.get("/v1/gpu")["units"]
        assert (unit["id"], unit["class"], unit["runtimes"], unit["held_by"]) == (BUS, "h100", ["microvm"], None)

        def ask():
            return [a for a in consumer.get("/v1/book")["classes"].get("gpu", {}).get("asks", [])
                    if a.get("gpu_class") == "h100"]
        (a,) = wait_for(ask, 60, what="the provider's microVM H100 ask in the consumer's book")
        assert a["runtimes"] == ["microvm"] and a["gpus"] == 1
        # A container bid does not match a GPU only a microVM can take.
        c = submit(consumer, "--runtime", "container", "--gpus", "1", str(BUSYBOX_TAR), "--", "true")
        assert "runtime excluded 1" in wait_job(consumer, c, timeout=60)["error"]
        job_id = submit(consumer, "--runtime", "microvm", "--gpus", "1", "--gpu-class", "h100",
                        str(BUSYBOX_TAR), "--", "true")
        j = wait_job(consumer, job_id, timeout=90)
        # The provider built the task's devices from the agreement (which named the PCI unit),
        # then refused to start QEMU on a group node it cannot open: a failed start, no leg.
        assert j["state"] == "failed" and f"cannot open /dev/vfio/13 for {BUS}" in j["error"], j
        wait_for(lambda: prov.get("/v1/gpu")["units"][0]["held_by"] is None, 20, what="the device released")


# ---- the guest: does it see a device on the microvm machine's PCIe bus? ------------------------------

class _StandInMachine(Machine):
    """The machine a GPU task gets, with QEMU's emulated ``pci-testdev`` (1b36:0005) where
    the host's GPU would be: no IOMMU here, so the only stand-in is an emulated device."""

    def qemu_argv(self, *args, **kwargs):
        argv = super().qemu_argv(*args, **kwargs)
        argv[argv.index(f"vfio-pci,host={BUS}")] = "pci-testdev"
        return argv


@pytest.mark.slow
async def test_the_guest_enumerates_a_device_on_the_microvm_pcie_bus(tmp_path):
    from jobs_helpers import BUSYBOX_TAR, ensure_assets
    from sandbox_helpers import run_to_end
    rt = MicroVMRuntime()
    if not rt.available().available:
        pytest.skip(f"microvm unavailable: {rt.available().reason}")
    ensure_assets()
    script = "for d in /sys/bus/pci/devices/*; do echo $(cat $d/vendor):$(cat $d/device); done"
    sb = await rt.prepare(TaskSpec(kind="microvm", artifact=BUSYBOX_TAR, args=["sh", "-c", script],
                                   limits=Limits(memory_bytes=4 << 30), workdir=tmp_path / "vm"))
    m = sb.machine
    sb.machine = _StandInMachine(vmm=m.vmm, binary=m.binary, accel=m.accel, kernel=m.kernel,
                                 initramfs=m.initramfs, mem_mib=m.mem_mib, smp=m.smp, cmdline=m.cmdline,
                                 exec_channel=m.exec_channel, vfio=[{"pci_bus_id": BUS, "iommu_group": "13"}])
    assert "microvm,pcie=on" in sb.machine.qemu_argv(sb._qmp_path, None, sb._exec_path)
    status, out, err = await run_to_end(sb)
    assert status.code == 0, (status, err, sb.diagnostics[-2000:])
    assert "0x1b36:0x0005" in out.decode().split(), out  # the stand-in, enumerated by the guest kernel
