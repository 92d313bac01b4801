"""Derive asks from offerable capacity and a pricing policy.

Price per unit-hour (unit = a core for ``cpu``, a device for accelerators):

    cost   = watts_per_unit / 1000 * electricity_per_kwh      (power)
           + depreciation_per_unit_hour
           + memory GiB per unit * depreciation_per_gib_hour
    price  = cost * (1 + margin) * demand * (1 + protocol_fee)
           * (1 - preemptible_discount if preemptible)
    demand = clamp(((bid units + 1) / (ask units + 1)) ** sensitivity,
                   demand_min, demand_max)       observed in the book

The +1 keeps an empty book at exactly 1x.
"""

from __future__ import annotations

from dataclasses import dataclass

from synord.protocols.orders import CPU_CLASS, Ask, RUNTIMES

GIB = 1 << 30


@dataclass(frozen=True)
class PricingPolicy:
    electricity_per_kwh: float = 0.25
    watts_per_core: float = 12.0
    watts_per_gpu: float = 250.0
    depreciation_per_core_hour: float = 0.002
    depreciation_per_gpu_hour: float = 0.08
    depreciation_per_gib_hour: float = 0.0004
    margin: float = 0.10
    protocol_fee: float = 0.02
    preemptible_discount: float = 0.30
    demand_sensitivity: float = 1.0
    demand_min: float = 0.5
    demand_max: float = 2.0
    min_duration_s: int = 0
    max_duration_s: int = 7 * 24 * 3600
    ttl_ms: int = 10 * 60 * 1000
    region: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.demand_min <= 1 <= self.demand_max:
            raise ValueError("need 0 < demand_min <= 1 <= demand_max")
        if not 0 <= self.preemptible_discount < 1:
            raise ValueError("preemptible_discount must be in [0, 1)")
        for name in ("electricity_per_kwh", "watts_per_core", "watts_per_gpu", "margin", "protocol_fee",
                     "depreciation_per_core_hour", "depreciation_per_gpu_hour", "depreciation_per_gib_hour"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


def demand_multiplier(policy: PricingPolicy, ask_units: float, bid_units: float) -> float:
    raw = ((bid_units + 1.0) / (ask_units + 1.0)) ** policy.demand_sensitivity
    return min(policy.demand_max, max(policy.demand_min, raw))


# A GPU class's wear is priced by what the device is worth to a buyer: its
# peak FP16 (tensor) throughput from the known-device table, relative to a
# reference card of 100 TFLOPS (RTX 3090/4090-class), within [0.25, 20].
REFERENCE_FP16_GFLOPS = 100_000.0
CLASS_FACTOR_RANGE = (0.25, 20.0)


def gpu_class_factor(gpu_class: str | None) -> float:
    """Depreciation multiplier of a GPU class (`synord.hwprobe.gpu_units` names; MIG classes
    ``h100-1g-10gb`` pay their share of the parent by the slice count)."""
    from synord.hwprobe import known
    if not gpu_class or gpu_class == "consumer":
        return 1.0
    slug, _, mig = gpu_class.partition("-")
    entry = next((e for e in known.table() if e["slug"] == gpu_class and e["kind"] == "gpu"), None) or \
        next((e for e in known.table() if e["slug"] == slug and e["kind"] == "gpu"), None)
    if entry is None or not entry.get("fp16_gflops"):
        return 1.0
    f = entry["fp16_gflops"] / REFERENCE_FP16_GFLOPS
    if mig and entry["slug"] != gpu_class and mig[:1].isdigit() and mig[1:2] == "g":
        f *= int(mig[0]) / 7.0  # a MIG slice: g of the GPU's 7 compute slices
    lo, hi = CLASS_FACTOR_RANGE
    return min(hi, max(lo, f))


def unit_cost(policy: PricingPolicy, resource_class: str, memory_gib_per_unit: float,
              gpu_class: str | None = None, watts: float | None = None) -> float:
    if resource_class == CPU_CLASS:
        power, dep = policy.watts_per_core, policy.depreciation_per_core_hour
    else:
        power = policy.watts_per_gpu if watts is None else watts
        dep = policy.depreciation_per_gpu_hour * gpu_class_factor(gpu_class)
    return power / 1000.0 * policy.electricity_per_kwh + dep + memory_gib_per_unit * policy.depreciation_per_gib_hour


def unit_price(policy: PricingPolicy, resource_class: str, memory_gib_per_unit: float,
               demand: float = 1.0, preemptible: bool = False, gpu_class: str | None = None,
               watts: float | None = None) -> float:
    p = unit_cost(policy, resource_class, memory_gib_per_unit, gpu_class, watts) * (1 + policy.margin) * demand
    p *= 1 + policy.protocol_fee
    if preemptible:
        p *= 1 - policy.preemptible_discount
    return p


def derive_asks(capacity: dict, policy: PricingPolicy, *, now: int, seq: int | None = None,
                preemptible: bool = False, supply_demand=None, load: float = 0.0,
                perf: float | None = None, id_prefix: str = "") -> list[Ask]:
    """Asks for offerable ``capacity``: one ``cpu`` ask, plus one per accelerator class.

    ``capacity``: ``{"cpus": float, "memory_bytes": int, "gpus": int,
    "gpu_class": str, "runtimes": [...]}``.  ``supply_demand(class) -> (ask
    units, bid units)`` is usually ``OrderBook.supply_demand``.  ``seq``
    defaults to ``now`` so that asks re-derived after a restart still replace
    the older ones.
    """
    runtimes = tuple(r for r in capacity.get("runtimes", ()) if r in RUNTIMES)
    if not runtimes:
        return []
    cpus = float(capacity.get("cpus", 0.0))
    memory = int(capacity.get("memory_bytes", 0))
    gpus = int(capacity.get("gpus", 0))
    seq = now if seq is None else seq
    common = dict(seq=seq, memory=memory, expires=now + policy.ttl_ms, runtimes=runtimes,
                  min_duration_s=policy.min_duration_s, max_duration_s=policy.max_duration_s,
                  preemptible=preemptible, region=policy.region, load=load, perf=perf)
    asks = []
    rows = [(CPU_CLASS, cpus, cpus, 0, None, {})]
    if capacity.get("gpu_classes"):  # one ask per class of device units (synord.gpu_devices.offer_classes)
        rows += [("gpu", float(c["count"]), cpus, int(c["count"]), c["class"], c)
                 for c in capacity["gpu_classes"]]
    else:
        rows.append(("gpu", float(gpus), cpus, gpus, capacity.get("gpu_class"), {}))
    for cls, n_units, cores, n_gpus, gpu_class, extra in rows:
        if n_units <= 0:
            continue
        sup, dem = supply_demand(cls) if supply_demand else (0.0, 0.0)
        price = unit_price(policy, cls, memory / GIB / n_units, demand_multiplier(policy, sup, dem), preemptible,
                           gpu_class=gpu_class, watts=extra.get("watts"))
        ask_id = f"{id_prefix}{cls}" if not extra else f"{id_prefix}{cls}:{extra.get('ask_key') or gpu_class}"
        fields = dict(common, runtimes=tuple(r for r in extra.get("runtimes", runtimes) if r in runtimes))
        if not fields["runtimes"]:
            continue  # no sandbox here can take these devices
        asks.append(Ask(id=ask_id, resource_class=cls, cores=cores, gpus=n_gpus, gpu_class=gpu_class,
                        price=round(price, 9), gpu_memory=extra.get("memory"), cuda=extra.get("cuda"), **fields))
    return asks
