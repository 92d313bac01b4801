"""Provider side: which GPU (by UUID) belongs to which agreement.

Every device unit (synord.hwprobe.gpu_units) is held by at most one reservation: the
table's primary key is the unit id, so a unit can never be in two tasks, and
a check-and-take runs inside one SQLite transaction on the daemon's single
trio thread (a racing second proposal finds the unit taken and is told
"capacity").  The reservation is keyed like the market's capacity
reservation (``consumer/nid``) and made in the same admission step, so the
agreement the provider signs names exactly the devices it holds.

Released on every exit path: the negotiation ends without a task (rejected,
expired, abandoned: `release`), the task ends (succeeded, failed, cancelled,
handed over to another provider: `task_ended`; a lease that ends first does
not free the devices of a task still running), and, after a crash, when the
daemon starts again (`release_all`: a provider's tasks do not survive its
restart, so neither do their devices).

Also here: the CDI edits that inject a reservation's devices into the task
(`CDIDevices`), from the spec files in the configured directories or, for
NVIDIA GPUs with no spec, one generated from NVML and the host.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from synord.runtimes import cdi

from .market.reservations import InsufficientCapacity

log = logging.getLogger("synord.gpu")

SCHEMA = """
CREATE TABLE gpu_allocations (
    unit TEXT PRIMARY KEY,      -- device unit id: GPU-/MIG- UUID, or PCI bus id
    holder TEXT NOT NULL,       -- consumer/nid of the negotiation that holds it
    created REAL NOT NULL
);
CREATE INDEX gpu_allocations_holder ON gpu_allocations(holder);
"""


def _cc(v: str | None) -> tuple[int, int] | None:
    # Not synord.protocols.orders.cuda_tuple: this module stays importable without the wire stack
    # (bench/gpu_check.sh runs it in a venv with only trio, psutil, nvidia-ml-py, pyyaml).
    try:
        major, minor = str(v).split(".", 1)
        return int(major), int(minor)
    except (TypeError, ValueError):
        return None


def unit_fits(unit: dict, gpu_class: str | None = None, memory: int | None = None,
              cuda_capability: str | None = None) -> str | None:
    """Name of the constraint ``unit`` fails (class, memory, cuda), or None."""
    if gpu_class is not None and unit.get("class") != gpu_class:
        return "class"
    if memory and (unit.get("memory_bytes") or 0) < memory:
        return "memory"
    if cuda_capability:
        have, need = _cc(unit.get("compute_capability")), _cc(cuda_capability)
        if have is None or need is None or have < need:
            return "cuda"
    return None


def holder_of(terms) -> str:
    """The reservation key of an agreement: the market's (Provider._key: consumer/nid)."""
    return f"{terms.consumer}/{terms.nid.hex()}"


class GpuAllocator:
    def __init__(self, store, units: Callable[[], list[dict]]):
        self.store = store
        self.units = units  # the host's device units now (synord.hwprobe.gpu_units)
        # Holders whose task runs: their lease may end first (a silent consumer), but the
        # devices stay theirs until the task itself has ended (`task_ended`).
        self.running: set[str] = set()

    def held(self) -> dict[str, str]:
        return dict(self.store.conn.execute("SELECT unit, holder FROM gpu_allocations").fetchall())

    def free_units(self, gpu_class: str | None = None) -> list[dict]:
        taken = self.held()
        return [u for u in self.units() if u["id"] not in taken and unit_fits(u, gpu_class) is None]

    def reserve(self, holder: str, n: int, gpu_class: str | None = None, memory: int | None = None,
                cuda_capability: str | None = None, runtime: str | None = None) -> tuple[str, ...]:
        """Take ``n`` free units that fit (and that the sandbox ``runtime`` can take: a
        container's units by CDI, a microVM's by VFIO), atomically;
        InsufficientCapacity("gpus") if there are fewer."""
        if n <= 0:
            return ()
        with self.store.tx() as conn:
            taken = {r[0] for r in conn.execute("SELECT unit FROM gpu_allocations")}
            mine = [r[0] for r in conn.execute("SELECT unit FROM gpu_allocations WHERE holder = ?", (holder,))]
            if mine:
                return tuple(sorted(mine))  # the same negotiation asking again
            fit = [u["id"] for u in self.units()
                   if u["id"] not in taken and unit_fits(u, gpu_class, memory, cuda_capability) is None
                   and (runtime is None or runtime in unit_runtimes(u))]
            if len(fit) < n:
                raise InsufficientCapacity("gpus", n, len(fit))
            now = time.time()
            conn.executemany("INSERT INTO gpu_allocations(unit, holder, created) VALUES (?, ?, ?)",
                             [(u, holder, now) for u in fit[:n]])
        return tuple(fit[:n])

    def release(self, holder: str) -> int:
        if holder in self.running:
            log.info("lease ended while its task runs: devices kept until it ends", extra={"holder": holder[:24]})
            return 0
        with self.store.tx() as conn:
            n = conn.execute("DELETE FROM gpu_allocations WHERE holder = ?", (holder,)).rowcount
        if n:
            log.info("devices released", extra={"holder": holder[:24], "count": n})
        return n

    def task_started(self, holder: str) -> None:
        self.running.add(holder)

    def task_ended(self, holder: str) -> int:
        self.running.discard(holder)
        return self.release(holder)

    def release_all(self) -> int:
        """At start: the previous life's tasks are gone, and with them their claim on devices."""
        with self.store.tx() as conn:
            n = conn.execute("DELETE FROM gpu_allocations").rowcount
        if n:
            log.warning("devices of a previous run released", extra={"count": n})
        return n

    def to_json(self) -> dict:
        held = self.held()
        return {"units": [{**{k: u.get(k) for k in ("id", "class", "vendor", "memory_bytes",
                                                      "compute_capability", "cdi")},
                           "runtimes": unit_runtimes(u), "held_by": held.get(u["id"])} for u in self.units()]}


class CDIDevices:
    """CDI edits for a set of device units: spec files first, generated specs otherwise."""

    CACHE_S = 5.0  # spec files rarely change; offers and admissions ask often

    def __init__(self, dirs, units: Callable[[], list[dict]], dev_root: str = "/dev"):
        self.dirs = list(dirs)
        self.units = units
        self.dev_root = dev_root
        self._cached: tuple[float, cdi.Registry] | None = None

    def injectable(self, units: list[dict]) -> list[dict]:
        """The units a CDI spec (file or generated) can inject: only these are offered."""
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] > self.CACHE_S:
            self._cached = (now, self.registry())
        return [u for u in units if self._name(u, self._cached[1]) is not None]

    @staticmethod
    def _name(unit: dict, reg: cdi.Registry) -> str | None:
        """The name a spec gives ``unit``: by UUID, else the names of nvidia-ctk's other
        ``--device-name-strategy`` choices (``index`` "0", ``type-index`` "gpu0")."""
        names = [unit["cdi"]]
        if unit["vendor"] == "nvidia" and unit.get("index") is not None and not unit["id"].startswith("MIG-"):
            names += [f"nvidia.com/gpu={unit['index']}", f"nvidia.com/gpu=gpu{unit['index']}"]
        return next((n for n in names if reg.has(n)), None)

    def registry(self) -> cdi.Registry:
        units = self.units()
        generated = []
        nv = [u for u in units if u["vendor"] == "nvidia"]
        if nv:
            # A MIG instance's capability minors are read from the proc/ beside dev_root (the host's /proc).
            spec = cdi.nvidia_spec([{"uuid": u["id"], "minor": u.get("minor"), "index": u.get("index"),
                                     "gi": u.get("gi"), "ci": u.get("ci")} for u in nv], self.dev_root,
                                   proc_root=Path(self.dev_root).parent / "proc")
            if spec is not None:
                generated.append(spec)
        for vendor in ("amd", "intel"):
            mine = {u["cdi"].split("=", 1)[1]: u["nodes"] for u in units if u["vendor"] == vendor}
            if mine and (spec := cdi.dri_spec(f"{vendor}.com/gpu", mine, self.dev_root)) is not None:
                generated.append(spec)
        reg = cdi.Registry(self.dirs, extra=generated)
        for err in reg.errors:
            log.warning("CDI spec ignored", extra={"error": err})
        return reg

    def edits(self, unit_ids: tuple[str, ...]) -> dict:
        """The container edits for ``unit_ids`` (raises cdi.CDIError when one cannot be injected)."""
        by_id = {u["id"]: u for u in self.units()}
        missing = [u for u in unit_ids if u not in by_id]
        if missing:
            raise cdi.CDIError(f"device {missing[0]} is not on this host any more")
        units = [by_id[u] for u in unit_ids]
        reg = self.registry()
        e = reg.resolve([self._name(u, reg) or u["cdi"] for u in units])
        ids = ",".join(u["id"] for u in units if u["vendor"] == "nvidia")
        if ids:  # what CUDA and the NVIDIA tools read to pick devices
            e.env += [f"NVIDIA_VISIBLE_DEVICES={ids}", f"CUDA_VISIBLE_DEVICES={ids}"]
        return e.to_json()


# Sandboxes that can take a device unit: containers through CDI. A GPU bound to vfio-pci
# is a unit of its own that only a microVM takes (synord.runtimes.vfio; its "runtimes").
DEVICE_RUNTIMES = ("container",)


def unit_runtimes(unit: dict) -> list[str]:
    return list(unit.get("runtimes") or DEVICE_RUNTIMES)


def offer_classes(units: list[dict], allowed: int) -> list[dict]:
    """The GPU part of the offer: per class and sandbox, how many units, the least memory
    and CUDA capability among them, and the power they may draw (for the price). VFIO
    units get an ask of their own (``ask_key``): a bid for a container must not match them."""
    out: dict[tuple, dict] = {}
    for u in units[:max(0, allowed)]:
        rts = unit_runtimes(u)
        key = (u["class"], tuple(rts))
        c = out.setdefault(key, {"class": u["class"], "count": 0, "memory": None, "cuda": None,
                                 "watts": None, "runtimes": rts,
                                 **({} if rts == list(DEVICE_RUNTIMES) else {"ask_key": f"{u['class']}:{'+'.join(rts)}"})})
        c["count"] += 1
        if u.get("memory_bytes"):
            c["memory"] = u["memory_bytes"] if c["memory"] is None else min(c["memory"], u["memory_bytes"])
        cc = u.get("compute_capability")
        if cc and (c["cuda"] is None or _cc(cc) < _cc(c["cuda"])):
            c["cuda"] = cc
        if u.get("power_limit_w"):
            c["watts"] = max(c["watts"] or 0.0, float(u["power_limit_w"]))
    return list(out.values())


class GpuNode:
    """The node's GPU side in one place: units, allocation, CDI injection, metering."""

    VFIO_CACHE_S = 5.0  # a sysfs walk; offers and admissions ask often

    def __init__(self, store, units: Callable[[], list[dict]], cdi_dirs, dev_root: str = "/dev",
                 meter_interval_s: float = 1.0, vfio_units: Callable[[], list[dict]] = list):
        from .gpu_meter import GpuMeter
        self.host_units = units  # every GPU unit the probe found
        self.vfio_host_units = vfio_units  # GPUs bound to vfio-pci, for microVMs (none: [])
        self._vfio_cached: tuple[float, list[dict]] | None = None
        self.cdi = CDIDevices(cdi_dirs, units, dev_root)
        self.allocator = GpuAllocator(store, self.units)
        self.meter = GpuMeter(meter_interval_s)

    def units(self) -> list[dict]:
        """The units offered and allocated: those that can be injected into a task
        (containers by CDI), then those a microVM can take (VFIO)."""
        now = time.monotonic()
        if self._vfio_cached is None or now - self._vfio_cached[0] > self.VFIO_CACHE_S:
            self._vfio_cached = (now, self.vfio_host_units())
        return self.cdi.injectable(self.host_units()) + self._vfio_cached[1]

    def to_json(self) -> dict:
        """``GET /v1/gpu``: the offered units and who holds them, the ones that cannot be
        injected (no CDI spec and none could be generated), and the metered tasks."""
        offered = {u["id"] for u in self.units()}
        return {**self.allocator.to_json(),
                "not_injectable": [u["id"] for u in self.host_units() if u["id"] not in offered],
                "metering": {k: m.totals() for k, m in self.meter.meters.items()}}

    def task_devices(self, unit_ids: tuple[str, ...], kind: str = "container") -> dict:
        """TaskSpec.devices for a task's agreed units: CDI edits for a container,
        ``{"vfio": [{pci_bus_id, iommu_group}]}`` for a microVM (ValueError when they
        cannot be given to that sandbox)."""
        by_id = {u["id"]: u for u in self.units()}
        wrong = [u for u in unit_ids if u not in by_id or kind not in unit_runtimes(by_id[u])]
        if wrong:
            raise ValueError(f"device {wrong[0]} cannot be given to a {kind} (gone, or another sandbox's unit)")
        if kind == "microvm":
            return {"vfio": [dict(by_id[u]["vfio"]) for u in unit_ids]}
        return self.cdi.edits(unit_ids)  # cdi.CDIError is a ValueError

    def task_started(self, terms) -> None:
        """The task under ``terms`` starts: its devices are held until it ends; meter them."""
        self.allocator.task_started(holder_of(terms))
        self.metering(terms.aid.hex(), terms.devices)

    def metering(self, key: str, unit_ids: tuple[str, ...]) -> None:
        """Meter the NVIDIA (NVML) and AMD (sysfs) units of the task under agreement ``key`` (hex)."""
        by_id = {u["id"]: u for u in self.units()}
        nv = {u: by_id[u]["index"] for u in unit_ids if u in by_id and by_id[u]["vendor"] == "nvidia"
              and by_id[u].get("index") is not None and not by_id[u].get("vfio")}
        amd = {u: by_id[u]["sysfs"] for u in unit_ids if u in by_id and by_id[u]["vendor"] == "amd"
               and by_id[u].get("sysfs") and not by_id[u].get("vfio")}
        if nv or amd:
            self.meter.start(key, nv, amd)

    def settle(self, terms, outcome: str, usage, settle: Callable) -> None:
        """The task under ``terms`` ended: the market's settle with its GPU totals (the
        receipt), then its devices are free."""
        try:
            settle(terms, usage.cpu_s, usage.peak_memory_bytes, outcome, self.meter.stop(terms.aid.hex()))
        finally:
            self.allocator.task_ended(holder_of(terms))
