"""Contributor preferences, the one decision "contributing now, and if not why",
and what the preferences leave to offer; market resource classes.

A contributor shares a fraction of the machine, possibly only when the user
is idle, on mains power, above a battery level, within some hours, while the
task cache and today's transfers stay under their limits. `PREFERENCES` is
the table of every preference (type, default, help): config.toml's
[contributor] section, `synord limits` and the limits API are generated from
it. `decide` is the only place that says whether the node contributes: the
daemon's status, limits, asks and admission all read its answer. A
preference this machine cannot evaluate (no idle signal, no cgroup to
throttle) is never silently dropped: `evaluability` names it and `decide`
treats it as not satisfied.
"""

from __future__ import annotations

import dataclasses
import math
import re

_HOURS = re.compile(r"^(\d{1,2})-(\d{1,2})$")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_UNMEASURED = {"daily_transfer_bytes": "today's transfers not measured yet",
               "disk_limit_bytes": "task cache size not measured yet"}
NO_IDLE = "cannot evaluate: no idle signal (no logind IdleHint, no terminal sessions)"


@dataclasses.dataclass(frozen=True)
class Pref:
    default: object
    type: str   # share (0..1), percent, bool, seconds, bytes, bytes/s, hours ("22-07"), weekly
    help: str
    needs: str = ""  # the signal it cannot be evaluated without: "idle", "gpu", "throttle", "usage"

    @property
    def toml_type(self) -> str:
        return {"share": "float", "percent": "float", "bool": "bool", "seconds": "int", "bytes": "int",
                "bytes/s": "int", "hours": "str", "weekly": "str"}[self.type]


# Defaults here are a desktop contributor's (config.toml); 0 / "" mean "no limit".
PREFERENCES: dict[str, Pref] = {
    "cpu_share": Pref(1.0, "share", "share of CPU cores offered, 0..1"),
    "cpu_time_percent": Pref(100.0, "percent", "CPU-time throttle: each task's cgroup gets this % of its "
                             "cores (cpu.max), 1..100", "throttle"),
    "memory_share": Pref(0.75, "share", "share of memory offered while the computer is in use, 0..1"),
    "memory_share_idle": Pref(0.9, "share", "share of memory offered while the user is idle, 0..1", "idle"),
    "gpu_share": Pref(1.0, "share", "share of GPUs offered, 0..1", "gpu"),
    "gpu_idle_only": Pref(False, "bool", "offer GPUs only while the user is idle", "idle"),
    "idle_only": Pref(False, "bool", "only take work while the user is idle", "idle"),
    "idle_after_s": Pref(300, "seconds", "seconds without input that count as idle", "idle"),
    "suspend_cpu_percent": Pref(0.0, "percent", "suspend tasks while other processes use more than this % "
                                "of the CPUs; 0 = never"),
    "ac_only": Pref(False, "bool", "only take work on AC power"),
    "min_battery_percent": Pref(20, "percent", "stop below this battery level"),
    "allowed_hours": Pref("", "hours", "e.g. \"22-07\" (local time, end exclusive); empty = any hour"),
    "weekday_hours": Pref("", "weekly", "hours per weekday, e.g. \"mon-fri 18-08; sat,sun 00-24\"; "
                          "days not listed: no work; empty = every day"),
    "network_hours": Pref("", "hours", "hours when artefacts and checkpoints may be transferred "
                          "(no new work outside them); empty = any hour"),
    "bandwidth_bytes_per_s": Pref(0, "bytes/s", "cap on task transfers in bytes per second; 0 = none"),
    "daily_transfer_bytes": Pref(0, "bytes", "no new work once this much was transferred today; 0 = none",
                                 "usage"),
    "disk_limit_bytes": Pref(0, "bytes", "no new work while the task cache (artefacts, checkpoints, "
                             "work dirs) is larger; 0 = none", "usage"),
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?(?:/s)?\s*$", re.IGNORECASE)


def parse_bytes(value) -> int:
    """1048576, "512M", "2 GiB", "10MB/s" -> bytes (binary units)."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, (int, float)):
        return int(value)
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (e.g. 512M, 2G)")
    return int(float(m[1]) * (1 << (10 * " kmgt".index(m[2].lower() or " "))))


def coerce(key: str, value):
    """A preference value as typed by a person or sent as JSON, converted to its type."""
    pref = PREFERENCES.get(key)
    if pref is None:
        raise ValueError(f"unknown preference {key!r}")
    if value is None:
        return None
    kind = pref.type
    if kind == "bool":
        if isinstance(value, bool):
            return value
        low = str(value).strip().lower()
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if kind in ("bytes", "bytes/s"):
        return parse_bytes(value)
    if kind in ("share", "percent", "seconds"):
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        try:
            num = float(str(value).strip().rstrip("%"))
        except ValueError:
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
        return num
    return str(value).strip()


def _parse_hours(text: str, key: str) -> tuple[int, int]:
    m = _HOURS.match(text.strip())
    if not m or int(m[1]) > 23 or int(m[2]) > 24 or int(m[1]) == int(m[2]):
        raise ValueError(f'{key} must look like "09-17", got {text!r}')
    return int(m[1]), int(m[2])  # "00-24": the whole day


def _parse_days(text: str) -> list[int]:
    days: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().lower().partition("-")
        if lo not in DAYS or (hi and hi not in DAYS):
            raise ValueError(f"unknown day {part.strip()!r} (mon, tue, … sun)")
        a, b = DAYS.index(lo), DAYS.index(hi or lo)
        days += [(a + i) % 7 for i in range(((b - a) % 7) + 1)]
    return days


def parse_weekly(text: str) -> dict[int, tuple[int, int]]:
    """"mon-fri 18-08; sat,sun 00-24" -> {weekday (0 = Monday): (start, end)}."""
    out: dict[int, tuple[int, int]] = {}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        days, _, hours = entry.rpartition(" ")
        if not days:
            raise ValueError(f'weekday_hours entries look like "mon-fri 18-08", got {entry!r}')
        span = _parse_hours(hours, "weekday_hours")
        for d in _parse_days(days):
            out[d] = span
    return out


@dataclasses.dataclass
class ContributorLimits:
    """The preferences as `decide` reads them. Defaults here mean "no limit"
    (a bare `synord.hwprobe.probe`); config.toml's defaults are in PREFERENCES."""
    cpu_share: float = 1.0          # fraction of the usable CPUs
    memory_share: float = 0.8       # fraction of usable memory while in use (the OS keeps the rest)
    gpu_share: float = 1.0          # fraction of whole GPUs (rounded down)
    idle_only: bool = False
    idle_after_s: float = 300.0     # how long without input counts as idle
    ac_only: bool = False
    min_battery_percent: float | None = None
    allowed_hours: str | None = None  # "09-17" (local time, end exclusive); "22-06" wraps
    cpu_time_percent: float = 100.0
    memory_share_idle: float | None = None  # None: memory_share, idle or not
    gpu_idle_only: bool = False
    suspend_cpu_percent: float = 0.0
    weekday_hours: str | None = None
    network_hours: str | None = None
    bandwidth_bytes_per_s: int = 0
    daily_transfer_bytes: int = 0
    disk_limit_bytes: int = 0

    def __post_init__(self):
        for name in ("cpu_share", "memory_share", "gpu_share", "memory_share_idle"):
            v = getattr(self, name)
            if v is None and name == "memory_share_idle":
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {v!r}")
        if self.min_battery_percent is not None and not 0 <= self.min_battery_percent <= 100:
            raise ValueError(f"min_battery_percent must be 0..100, got {self.min_battery_percent!r}")
        if not 1 <= self.cpu_time_percent <= 100:
            raise ValueError(f"cpu_time_percent must be 1..100, got {self.cpu_time_percent!r}")
        if not 0 <= self.suspend_cpu_percent <= 100:
            raise ValueError(f"suspend_cpu_percent must be 0..100 (0 = never), got {self.suspend_cpu_percent!r}")
        if self.idle_after_s < 0:
            raise ValueError(f"idle_after_s must be >= 0, got {self.idle_after_s!r}")
        for name in ("bandwidth_bytes_per_s", "daily_transfer_bytes", "disk_limit_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a size >= 0 (0 = no limit), got {v!r}")
        for name in ("allowed_hours", "network_hours"):
            if getattr(self, name):
                _parse_hours(getattr(self, name), name)
        if self.weekday_hours:
            try:
                parse_weekly(self.weekday_hours)
            except ValueError as exc:
                raise ValueError(f"weekday_hours is not valid: {exc}") from None

    def hours(self) -> tuple[int, int] | None:
        return _parse_hours(self.allowed_hours, "allowed_hours") if self.allowed_hours else None

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


@dataclasses.dataclass
class Usage:
    """What the daemon measures of its own footprint (None: not measured)."""
    cache_bytes: int | None = None
    transferred_today_bytes: int | None = None


@dataclasses.dataclass
class Decision:
    contributing: bool
    reasons: list[str]          # why not, in order; empty when contributing
    hand_back: bool             # running tasks must leave (owner reasons), not only "no new work"
    throttle: float             # share of each task's cores its cgroup may use now (cpu.max)
    memory_share: float         # the memory share that applies now (idle or in use)
    gpus_allowed: bool

    @property
    def why_not(self) -> str | None:
        return "; ".join(self.reasons) or None


def _is_idle(limits: ContributorLimits, signals) -> bool | None:
    if signals.user_idle_s is None:
        return None
    return signals.user_idle_s >= limits.idle_after_s


def evaluability(limits: ContributorLimits, signals, *, gpus: int | None = None,
                 can_throttle: bool | None = None, usage: Usage | None = None) -> dict[str, str]:
    """Preference -> why it cannot be evaluated here, for each one that cannot
    (None arguments: not known to the caller, not reported)."""
    out: dict[str, str] = {}
    if signals.user_idle_s is None:
        for key, pref in PREFERENCES.items():
            if pref.needs == "idle":
                out[key] = NO_IDLE
    if gpus == 0:
        for key in ("gpu_share", "gpu_idle_only"):
            out.setdefault(key, "cannot evaluate: no GPU on this machine")
    if can_throttle is False:
        out["cpu_time_percent"] = "cannot evaluate: no container runtime with cgroups here (wasm and " \
                                  "microVM tasks are not throttled)"
    if usage is not None:
        if usage.cache_bytes is None:
            out["disk_limit_bytes"] = "cannot evaluate: " + _UNMEASURED["disk_limit_bytes"]
        if usage.transferred_today_bytes is None:
            out["daily_transfer_bytes"] = "cannot evaluate: " + _UNMEASURED["daily_transfer_bytes"]
    return out


def decide(limits: ContributorLimits, signals, usage: Usage | None = None, *,
           enabled: bool = True, paused: bool = False) -> Decision:
    """Whether this node contributes now, and every reason it does not. The one
    function status, limits, the dashboard and the asks all read.

    ``usage`` None: the caller measures no task cache or transfers (a bare
    probe); their limits are then not checked here. A preference that needs
    an idle signal the machine lacks counts as not satisfied."""
    reasons: list[str] = []
    hand_back = False

    def no(reason: str, owner: bool) -> None:
        nonlocal hand_back
        reasons.append(reason)
        hand_back = hand_back or owner

    if not enabled:
        no("disabled in config.toml (contributor.enabled = false)", True)
    if paused:
        no("paused by the owner", True)
    if limits.ac_only and not signals.on_ac_power:
        no("on battery power (ac_only)", True)
    if (limits.min_battery_percent is not None and signals.battery_percent is not None
            and signals.battery_percent < limits.min_battery_percent):
        no(f"battery at {signals.battery_percent:.0f}% < {limits.min_battery_percent:.0f}%", True)
    idle = _is_idle(limits, signals)
    if limits.idle_only and idle is None:
        no(f"idle_only: {NO_IDLE}", True)
    elif limits.idle_only and not idle:
        no(f"user active {signals.user_idle_s:.0f}s ago (idle_only, needs {limits.idle_after_s:.0f}s)", True)
    span = limits.hours()
    if span is not None and not _in_hours(signals.hour_of_day, span):
        no(f"outside allowed hours {limits.allowed_hours} (now {signals.hour_of_day:02d}h)", True)
    weekday = getattr(signals, "weekday", None)
    if limits.weekday_hours:
        week = parse_weekly(limits.weekday_hours)
        if weekday is None:
            no("weekday_hours: cannot evaluate: no weekday signal", True)
        elif weekday not in week or not _in_hours(signals.hour_of_day, week[weekday]):
            today = "%02d-%02d" % week[weekday] if weekday in week else "no hours"
            no(f"outside weekday hours ({DAYS[weekday]}: {today}; now {signals.hour_of_day:02d}h)", True)
    if limits.network_hours:
        net = _parse_hours(limits.network_hours, "network_hours")
        if not _in_hours(signals.hour_of_day, net):
            no(f"outside network hours {limits.network_hours} (now {signals.hour_of_day:02d}h): "
               "no new work", False)
    throttle = limits.cpu_time_percent / 100.0
    other = 100.0 * float(signals.cpu_pressure or 0.0)
    if limits.suspend_cpu_percent and other > limits.suspend_cpu_percent:
        no(f"suspended: other processes use {other:.0f}% CPU (> {limits.suspend_cpu_percent:.0f}%)", False)
        throttle = 0.01  # tasks keep their place but get 1 % of their cores
    for key, used, over in (
            ("daily_transfer_bytes", usage and usage.transferred_today_bytes,
             "daily transfer limit reached ({used} of {limit} today)"),
            ("disk_limit_bytes", usage and usage.cache_bytes, "task cache {used} over its disk limit {limit}")):
        limit = getattr(limits, key)
        if usage is None or not limit:
            continue
        if used is None:
            no(f"{key}: cannot evaluate: {_UNMEASURED[key]}", False)
        elif used >= limit:
            no(over.format(used=_size(used), limit=_size(limit)), False)
    memory_share = limits.memory_share
    if idle and limits.memory_share_idle is not None:
        memory_share = limits.memory_share_idle
    gpus_allowed = limits.gpu_share > 0 and (not limits.gpu_idle_only or bool(idle))
    return Decision(contributing=not reasons, reasons=reasons, hand_back=hand_back, throttle=throttle,
                    memory_share=memory_share, gpus_allowed=gpus_allowed)


def _size(n: int) -> str:
    # hwprobe never imports synord (synord.humanize has the full formatter)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def offerable(profile, limits: ContributorLimits | None, signals, usage: Usage | None = None,
              decision: Decision | None = None) -> dict:
    limits = limits or ContributorLimits()
    host = profile.host
    usable_gpus = [d for d in profile.devices if d.get("kind") == "gpu" and d.get("usable", True)
                   and not d.get("integrated")]
    decision = decision or decide(limits, signals, usage)
    if not decision.contributing:
        return {"cpus": 0.0, "memory_bytes": 0, "gpus": 0, "opencl_devices": 0,
                "allowed": False, "why_not": decision.why_not}
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
    offer_mem = int(mem * decision.memory_share)
    if avail is not None:
        offer_mem = max(0, min(offer_mem, int(avail)))
    gpu_share = limits.gpu_share if decision.gpus_allowed else 0.0
    gpus = math.floor(len(usable_gpus) * gpu_share + 1e-9)
    opencl = [d for d in profile.devices if d.get("kind") == "opencl"]
    opencl_ok = [d for d in opencl
                 if (d.get("device_type") == "cpu" and limits.cpu_share > 0)
                 or (d.get("device_type") != "cpu" and gpu_share > 0)]
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
        elif kind == "gpu" and (d.get("mig_mode") or {}).get("current") and d.get("mig_devices"):
            from .gpu_units import mig_class  # MIG instances are units (and classes) of their own
            for m in d["mig_devices"]:
                add(f"gpu.{mig_class(d, m.get('profile') or 'mig')}")
        elif kind == "gpu":
            add(f"gpu.{d['slug']}" if d.get("tier") == "datacenter" and d.get("slug") else "gpu.consumer")
        elif kind:
            add(f"{kind}.{d['slug']}" if d.get("slug") else kind)
    return classes
