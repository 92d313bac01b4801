"""Scenarios: TOML files (built-in ones in ``scenarios/``), checked on load.

A bad file gives one `ScenarioError` line naming the key, never a traceback.
Two worlds:

* ``launch`` (Synkti's): unbounded identical instances launched on demand,
  one spot price trace (Ornstein–Uhlenbeck with a daily swing), each spot
  instance preempted after Exp(rate) hours;
* ``pool``: a fixed population of providers of several accelerator classes
  (hwprobe's known-device table), spot or on-demand, in regions; preemptions
  per provider plus scheduled region-wide events; one task per device.

``rules`` picks the accounting (accounting.py): ``published`` reproduces the
Synkti benchmark's rules with their defects, ``honest`` bills what is held.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

POLICIES = ("greedy", "fallback", "ondemand", "uniform-progress", "market")
PLANNERS = ("naive", "greedy", "optimal")
CHECKPOINTS = ("off", "periodic", "grace", "periodic+grace")


class ScenarioError(ValueError):
    """A scenario that cannot be run; the message is one line."""


@dataclass(frozen=True)
class Variant:
    name: str
    policy: str
    planner: str = "optimal"
    checkpoint: str = "grace"
    fallback_after: int = 2


@dataclass(frozen=True)
class Kind:
    name: str
    share: float
    work_h: tuple[float, float]
    state_mb: tuple[float, float] | None = None      # checkpoint size range
    state_mb_per_h: float | None = None              # or proportional to work (Synkti's KV cache)
    state_cap_mb: float = float("inf")
    memory_mb: tuple[float, float] | None = None     # None: memory = state
    checkpoint_interval_h: float | None = None       # periodic checkpoints (None: scenario default)
    deadline_factor: float | None = None             # deadline = arrival + factor x work


@dataclass(frozen=True)
class ProviderClass:
    model: str
    count: int
    gpus: int
    spot_fraction: float
    bandwidth_gbps: float
    watts: float
    depreciation_h: float
    regions: tuple[str, ...]
    memory_mb: float = 0.0   # model = "cpu": no table entry, so memory per slot and
    speed: float = 1.0       # speed are given (a slot = `cores` CPU cores)
    cores: float = 1.0


@dataclass(frozen=True)
class RegionEvent:
    at_h: float
    region: str
    fraction: float


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    world: str
    rules: str
    horizon_h: float
    tasks: int
    arrival_frac: float
    kinds: tuple[Kind, ...]
    variants: tuple[Variant, ...]
    grace_s: float = 120.0
    price_weight: float = 1.0
    checkpoint_interval_h: float = 1.0
    # launch world
    on_demand_price: float = 1.0
    spot: dict = field(default_factory=dict)
    instance_memory_mb: float = 24000.0
    instance_bandwidth_gbps: float = 10.0
    # pool world
    classes: tuple[ProviderClass, ...] = ()
    reference_model: str = ""
    spot_discount: float = 0.6
    preemption_rate_h: float = 0.05
    downtime_h: float = 2.0
    region_events: tuple[RegionEvent, ...] = ()
    max_price: float | None = None
    batch_limit: int = 500

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ScenarioError(f"scenario {self.name}: no variant {name!r}")

    @property
    def baseline(self) -> Variant | None:
        return next((v for v in self.variants if v.policy == "ondemand"), None)


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__package__).joinpath("scenarios").iterdir()
                  if p.name.endswith(".toml"))


def load(name_or_path: str) -> Scenario:
    """A built-in scenario by name, or a TOML file by path."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.exists():
        try:
            text = path.read_text()
        except OSError as exc:
            raise ScenarioError(f"cannot read scenario {name_or_path}: {exc.strerror}") from None
        default_name = path.stem
    else:
        res = resources.files(__package__).joinpath("scenarios", f"{name_or_path}.toml")
        if not res.is_file():
            raise ScenarioError(f"no scenario {name_or_path!r} (built-in: {', '.join(builtin_names())})")
        text, default_name = res.read_text(), name_or_path
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"scenario {name_or_path}: not TOML: {exc}") from None
    try:
        return parse(raw, default_name)
    except ScenarioError as exc:
        raise ScenarioError(f"scenario {name_or_path}: {exc}") from None


def _num(d: dict, key: str, default=None, lo: float = 0.0, hi: float = float("inf"), where: str = "") -> float:
    v = d.get(key, default)
    if v is None:
        raise ScenarioError(f"{where}{key} is required")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ScenarioError(f"{where}{key} must be a number in [{lo}, {hi}]")
    return float(v)


def _range(d: dict, key: str, where: str, required: bool = True):
    v = d.get(key)
    if v is None and not required:
        return None
    if (not isinstance(v, list) or len(v) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                         for x in v) or not 0 <= v[0] <= v[1]):
        raise ScenarioError(f"{where}{key} must be [low, high] with 0 <= low <= high")
    return (float(v[0]), float(v[1]))


def _choice(d: dict, key: str, options, default=None, where: str = "") -> str:
    v = d.get(key, default)
    if v not in options:
        raise ScenarioError(f"{where}{key} must be one of {', '.join(options)}")
    return v


def _kind(d: dict, i: int) -> Kind:
    w = f"kinds[{i}]."
    state = _range(d, "state_mb", w, required=False)
    per_h = d.get("state_mb_per_h")
    if (state is None) == (per_h is None):
        raise ScenarioError(f"{w}give exactly one of state_mb, state_mb_per_h")
    return Kind(name=str(d.get("name", f"kind{i}"))[:32], share=_num(d, "share", 1.0, where=w),
                work_h=_range(d, "work_h", w), state_mb=state,
                state_mb_per_h=None if per_h is None else _num(d, "state_mb_per_h", where=w),
                state_cap_mb=_num(d, "state_cap_mb", float("inf"), where=w),
                memory_mb=_range(d, "memory_mb", w, required=False),
                checkpoint_interval_h=(None if d.get("checkpoint_interval_h") is None
                                       else _num(d, "checkpoint_interval_h", lo=1e-6, where=w)),
                deadline_factor=(None if d.get("deadline_factor") is None
                                 else _num(d, "deadline_factor", lo=1.0, where=w)))


def parse(raw: dict, default_name: str = "scenario") -> Scenario:
    world = _choice(raw, "world", ("launch", "pool"))
    rules = _choice(raw, "rules", ("published", "honest"))
    if rules == "published" and world != "launch":
        raise ScenarioError("rules = 'published' exists only for world = 'launch'")
    tasks = raw.get("tasks", {})
    kinds = tuple(_kind(k, i) for i, k in enumerate(raw.get("kinds", [])))
    if not kinds:
        raise ScenarioError("at least one [[kinds]] table is required")
    variants = []
    for i, v in enumerate(raw.get("variants", [])):
        w = f"variants[{i}]."
        variants.append(Variant(name=str(v.get("name", f"v{i}"))[:48], policy=_choice(v, "policy", POLICIES, where=w),
                                planner=_choice(v, "planner", PLANNERS, "optimal", w),
                                checkpoint=_choice(v, "checkpoint", CHECKPOINTS, "grace", w),
                                fallback_after=int(_num(v, "fallback_after", 2, 1, 1000, w))))
    if not variants:
        raise ScenarioError("at least one [[variants]] table is required")
    if len({v.name for v in variants}) != len(variants):
        raise ScenarioError("variant names must be distinct")
    spot = raw.get("spot", {})
    spot = {k: _num(spot, k, dflt, where="spot.") for k, dflt in
            (("mean", 0.3), ("theta", 0.5), ("sigma", 0.2), ("dt_h", 0.1), ("daily_amplitude", 0.1),
             ("floor", 0.1), ("cap", 0.95), ("preemption_rate_h", 0.05))}
    classes = []
    for i, c in enumerate(raw.get("classes", [])):
        w = f"classes[{i}]."
        regions = c.get("regions", ["default"])
        if not isinstance(regions, list) or not regions or not all(isinstance(r, str) for r in regions):
            raise ScenarioError(f"{w}regions must be a non-empty list of names")
        classes.append(ProviderClass(model=str(c.get("model", "")), count=int(_num(c, "count", where=w, hi=1e7)),
                                     gpus=int(_num(c, "gpus", 1, 1, 64, w)),
                                     spot_fraction=_num(c, "spot_fraction", 0.5, 0, 1, w),
                                     bandwidth_gbps=_num(c, "bandwidth_gbps", 10, 1e-3, where=w),
                                     watts=_num(c, "watts", 300, where=w),
                                     depreciation_h=_num(c, "depreciation_h", 0.5, where=w),
                                     regions=tuple(regions),
                                     memory_mb=_num(c, "memory_mb", 0, where=w),
                                     speed=_num(c, "speed", 1.0, 1e-9, where=w),
                                     cores=_num(c, "cores", 1.0, 1e-3, where=w)))
    if world == "pool" and not classes:
        raise ScenarioError("world = 'pool' needs [[classes]] of providers")
    pre = raw.get("preemption", {})
    events = tuple(RegionEvent(_num(e, "at_h", where="preemption.events."), str(e.get("region", "")),
                               _num(e, "fraction", 1.0, 0, 1, "preemption.events."))
                   for e in pre.get("events", []))
    return Scenario(
        name=str(raw.get("name", default_name)), description=str(raw.get("description", "")),
        world=world, rules=rules, horizon_h=_num(raw, "horizon_h", 72, 1e-3),
        tasks=int(_num(tasks, "count", where="tasks.", hi=1e8)),
        arrival_frac=_num(tasks, "arrival_frac", 0.8, 0, 1, "tasks."),
        kinds=kinds, variants=tuple(variants), grace_s=_num(raw, "grace_s", 120),
        price_weight=_num(raw, "price_weight", 1.0),
        checkpoint_interval_h=_num(raw, "checkpoint_interval_h", 1.0, 1e-6),
        on_demand_price=_num(raw, "on_demand_price", 1.0), spot=spot,
        instance_memory_mb=_num(raw.get("instance", {}), "memory_mb", 24000, 1, where="instance."),
        instance_bandwidth_gbps=_num(raw.get("instance", {}), "bandwidth_gbps", 10, 1e-3, where="instance."),
        classes=tuple(classes), reference_model=str(raw.get("reference_model", "")),
        spot_discount=_num(raw, "spot_discount", 0.6, 0, 0.99),
        preemption_rate_h=_num(pre, "rate_h", spot["preemption_rate_h"], where="preemption."),
        downtime_h=_num(pre, "downtime_h", 2.0, where="preemption."), region_events=events,
        max_price=None if raw.get("max_price") is None else _num(raw, "max_price"),
        batch_limit=int(_num(raw, "batch_limit", 500, 1, 1e6)))
