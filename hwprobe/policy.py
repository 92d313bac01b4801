"""Contributor limits and what they leave to offer; market resource classes.

A contributor shares a fraction of the machine, possibly only when the user
is idle, on mains power, above a battery level, or within some hours. The
result of `offerable` is what admission control may hand out right now;
when the policy forbids contributing, every capacity is zero and `why_not`
says which rule applies.
"""

from __future__ import annotations

import dataclasses
import math
import re

_HOURS = re.compile(r"^(\d{1,2})-(\d{1,2})$")


@dataclasses.dataclass
class ContributorLimits:
    cpu_share: float = 1.0          # fraction of the usable CPUs
    memory_share: float = 0.8       # fraction of usable memory (the OS keeps the rest)
    gpu_share: float = 1.0          # fraction of whole GPUs (rounded down)
    idle_only: bool = False
    idle_after_s: float = 300.0     # how long without input counts as idle
    ac_only: bool = False
    min_battery_percent: float | None = None
    allowed_hours: str | None = None  # "09-17" (local time, end exclusive); "22-06" wraps

    def __post_init__(self):
        for name in ("cpu_share", "memory_share", "gpu_share"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {v!r}")
        if self.min_battery_percent is not None and not 0 <= self.min_battery_percent <= 100:
            raise ValueError(f"min_battery_percent must be 0..100, got {self.min_battery_percent!r}")
        if self.allowed_hours is not None:
            m = _HOURS.match(self.allowed_hours.strip())
            if not m or int(m[1]) > 24 or int(m[2]) > 24 or m[1] == m[2]:
                raise ValueError(f'allowed_hours must look like "09-17", got {self.allowed_hours!r}')

    def hours(self) -> tuple[int, int] | None:
        if self.allowed_hours is None:
            return None
        start, end = self.allowed_hours.strip().split("-")
        return int(start) % 24, int(end) % 24

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ContributorLimits":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown contributor limit(s): {', '.join(sorted(unknown))}")
        return cls(**d)


def _in_hours(hour: int, span: tuple[int, int]) -> bool:
    start, end = span
    return start <= hour < end if start < end else hour >= start or hour < end


def why_not(limits: ContributorLimits, signals) -> str | None:
    """The first policy rule that forbids contributing now, or None."""
    if limits.ac_only and not signals.on_ac_power:
        return "on battery power (ac_only)"
    if (limits.min_battery_percent is not None and signals.battery_percent is not None
            and signals.battery_percent < limits.min_battery_percent):
        return f"battery at {signals.battery_percent:.0f}% < {limits.min_battery_percent:.0f}%"
    # No detectable interactive user (headless, no sessions) counts as idle.
    if limits.idle_only and signals.user_idle_s is not None and signals.user_idle_s < limits.idle_after_s:
        return f"user active {signals.user_idle_s:.0f}s ago (idle_only, needs {limits.idle_after_s:.0f}s)"
    span = limits.hours()
    if span is not None and not _in_hours(signals.hour_of_day, span):
        return f"outside allowed hours {limits.allowed_hours} (now {signals.hour_of_day:02d}h)"
    return None


def offerable(profile, limits: ContributorLimits | None, signals) -> dict:
    limits = limits or ContributorLimits()
    host = profile.host
    usable_gpus = [d for d in profile.devices if d.get("kind") == "gpu" and d.get("usable", True)
                   and not d.get("integrated")]
    reason = why_not(limits, signals)
    if reason is not None:
        return {"cpus": 0.0, "memory_bytes": 0, "gpus": 0, "opencl_devices": 0,
                "allowed": False, "why_not": reason}
    cpus = float(host.get("effective_cpus") or host.get("logical_cores") or 0)
    # Never promise CPU time that other processes are using right now.
    free_cpus = cpus * (1.0 - min(1.0, max(0.0, signals.cpu_pressure)))
    offer_cpus = round(min(cpus * limits.cpu_share, free_cpus), 2)
    mem = host.get("memory_effective_bytes") or host.get("memory_total_bytes") or 0
    avail = host.get("memory_available_bytes")
    cg = host.get("cgroup") or {}
    if cg.get("memory_limit_bytes") is not None and cg.get("memory_usage_bytes") is not None:
        room = cg["memory_limit_bytes"] - cg["memory_usage_bytes"]
        avail = room if avail is None else min(avail, room)
    offer_mem = int(mem * limits.memory_share)
    if avail is not None:
        offer_mem = max(0, min(offer_mem, int(avail)))
    gpus = math.floor(len(usable_gpus) * limits.gpu_share + 1e-9)
    opencl = [d for d in profile.devices if d.get("kind") == "opencl"]
    opencl_ok = [d for d in opencl
                 if (d.get("device_type") == "cpu" and limits.cpu_share > 0)
                 or (d.get("device_type") != "cpu" and limits.gpu_share > 0)]
    return {"cpus": offer_cpus, "memory_bytes": offer_mem, "gpus": gpus,
            "opencl_devices": len(opencl_ok), "allowed": True, "why_not": None}


def resource_classes(profile) -> list[str]:
    """Market resource classes this host can serve: "cpu", "opencl",
    "gpu.<slug>" for known datacenter GPUs, "gpu.consumer" for other
    discrete GPUs, "<kind>.<slug>" for known TPUs / accelerators, bare kind
    for unknown ones."""
    classes: list[str] = []

    def add(c: str):
        if c not in classes:
            classes.append(c)

    for d in profile.devices:
        kind = d.get("kind")
        if d.get("usable") is False or d.get("integrated"):
            continue
        if kind == "cpu":
            add("cpu")
        elif kind == "opencl":
            add("opencl")
        elif kind == "gpu":
            add(f"gpu.{d['slug']}" if d.get("tier") == "datacenter" and d.get("slug") else "gpu.consumer")
        elif kind:
            add(f"{kind}.{d['slug']}" if d.get("slug") else kind)
    return classes
