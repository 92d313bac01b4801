"""GPU metering: while a task holds devices, sample them through NVML.

Per task: busy GPU-seconds (each sample's utilisation x the time since the
previous one, summed over its devices), the peak memory its devices held at
once, and the energy they drew (power x time).  The totals go into the usage
receipt (synord.protocols.receipts: gpu_s, gpu_peak_memory, gpu_energy_j).

The devices are the task's alone (synord.gpu_devices), so device-level NVML
counters are the task's usage.  NVML calls block: each round runs in a worker
thread (synord.hwprobe.nvidia.sample).  MIG instances have no utilisation counters of
their own in NVML; they are sampled through their parent (an upper bound).  AMD GPUs
(amdgpu) are sampled from sysfs instead (synord.hwprobe.sysfs.sample_amd); Intel GPUs
have no such counters there and are not metered, nor are GPUs passed to a microVM.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import trio

log = logging.getLogger("synord.gpu")


@dataclass
class Meter:
    devices: dict[str, int]  # uuid -> NVML index (of the parent for MIG)
    amd: dict[str, str] = field(default_factory=dict)  # PCI bus id -> its sysfs device dir
    last: float = field(default_factory=time.monotonic)
    gpu_s: float = 0.0
    energy_j: float = 0.0
    peak_memory: int = 0
    samples: int = 0

    def add(self, readings: dict[str, dict], now: float) -> None:
        dt, self.last = max(0.0, now - self.last), now
        mem = 0
        for r in readings.values():
            self.gpu_s += (r.get("utilization_percent") or 0) / 100.0 * dt
            self.energy_j += (r.get("power_w") or 0.0) * dt
            mem += r.get("memory_used_bytes") or 0
        self.peak_memory = max(self.peak_memory, mem)
        self.samples += 1

    def totals(self) -> dict:
        return {"gpu_s": round(self.gpu_s, 3), "gpu_peak_memory": int(self.peak_memory),
                "gpu_energy_j": round(self.energy_j, 3), "samples": self.samples}


class GpuMeter:
    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.meters: dict[str, Meter] = {}  # agreement id (hex) -> meter
        self._wake = trio.Event()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            # no metered task: sleep until one starts (no wakeups on an idle node)
            with trio.move_on_after(self.interval_s if self.meters else math.inf):
                await self._wake.wait()
            self._wake = trio.Event()
            for key in list(self.meters):
                await self._sample(key)

    async def _sample(self, key: str) -> None:
        m = self.meters.get(key)
        if m is None:
            return
        from synord.hwprobe import nvidia, sysfs
        try:
            with trio.fail_after(10):  # a hung driver must not stall the loop for ever
                readings = await trio.to_thread.run_sync(nvidia.sample, dict(m.devices), abandon_on_cancel=True) \
                    if m.devices else {}
                if m.amd:
                    readings.update(await trio.to_thread.run_sync(sysfs.sample_amd, dict(m.amd),
                                                                  abandon_on_cancel=True))
        except (trio.TooSlowError, OSError) as exc:
            log.warning("GPU sample failed", extra={"error": str(exc)})
            return
        m.add(readings, time.monotonic())

    def start(self, key: str, devices: dict[str, int], amd: dict[str, str] | None = None) -> None:
        """A task with ``devices`` (NVML) and ``amd`` (sysfs) starts: metered from now, first sample at once."""
        self.meters[key] = Meter(dict(devices), amd=dict(amd or {}))
        self._wake.set()

    def stop(self, key: str) -> dict | None:
        """The task ended: its totals up to the last sample (None if it was never metered).
        No last sample here: settling must not wait on NVML (nor be lost to a stopping node)."""
        m = self.meters.pop(key, None)
        return m.totals() if m is not None else None
