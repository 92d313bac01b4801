"""One simulated run: a scenario, a variant (policy, planner, checkpointing),
a seed.

Theory of operation.  Everything random is drawn from generators seeded by
(seed, stream): stream 0 draws the world shared by every variant (tasks, the
spot price trace, the pool's providers and their preemption times), so two
variants run on the same seed meet the same world and can be compared pair by
pair; stream 1 draws the launch world's per-instance preemption times; stream 2
stands in for Synkti's HashMap iteration order.

A task is pending, or on one instance.  Placement hands pending tasks to the
planner over the slots the policy allows; in the launch world whatever does
not fit a held instance launches its own (Synkti's rule), in the pool world it
waits for a device to free up.  A preemption notice displaces every task of the
instance: the grace-period decision (`synord.jobs.migration.decide_mode`) and
the checkpoint mode fix how much progress survives, then the displaced tasks
are placed again together.

Under ``published`` rules the run keeps Synkti's mechanics: completion events
are never cancelled (a task ends at first start + duration whatever happens),
progress is never tracked (every recovery restarts from zero), their naive and
maximising "KM" planners, the stale fit check that drops tasks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from synord.jobs.migration import Displaced, Slot, cost_matrix, INFEASIBLE
from synord.protocols.handover import decide_mode
from synord.market import pricing

from .accounting import Ledger
from .engine import EventQueue
from .policies import PLANNERS, Policy, synkti_km, synkti_naive
from .scenario import Scenario, ScenarioError, Variant

MB = 1_000_000          # Synkti counts memory in units of 1000 (24 GB = 24 000 MB)
NAIVE_CAPACITY_MB = 24 * 1024


class Task:
    __slots__ = ("id", "kind", "arrival", "work", "state_mb", "memory_mb", "interval", "deadline",
                 "progress", "saved", "inst", "start", "placed_at", "version", "done", "done_at",
                 "preemptions", "migrations", "displaced", "dropped", "legs")

    def __init__(self, id, kind, arrival, work, state_mb, memory_mb, interval, deadline):
        self.id, self.kind, self.arrival, self.work = id, kind, arrival, work
        self.state_mb, self.memory_mb, self.interval, self.deadline = state_mb, memory_mb, interval, deadline
        self.progress = 0.0   # work done (reference hours) at self.start
        self.saved = 0.0      # progress a checkpoint we hold preserves
        self.inst = None
        self.start = 0.0      # when work (re)started on self.inst (after any transfer)
        self.placed_at = 0.0
        self.version = 0
        self.done = False
        self.done_at = None
        self.preemptions = 0
        self.migrations = 0
        self.displaced = False
        self.dropped = False
        self.legs = None      # [(instance id, from, to)] when recording


class Instance:
    __slots__ = ("id", "group", "kind", "region", "memory_mb", "bandwidth_gbps", "price", "speed",
                 "max_tasks", "provider", "tasks", "used_mb", "held", "held_since", "alive", "slug")

    def __init__(self, id, group, kind, region, memory_mb, bandwidth_gbps, price, speed, max_tasks,
                 provider=None, slug=None):
        self.id, self.group, self.kind, self.region = id, group, kind, region
        self.memory_mb, self.bandwidth_gbps, self.price, self.speed = memory_mb, bandwidth_gbps, price, speed
        self.max_tasks, self.provider, self.slug = max_tasks, provider, slug
        self.tasks: list[Task] = []
        self.used_mb = 0.0
        self.held = False
        self.held_since = 0.0
        self.alive = True

    def fits(self, task) -> bool:
        return len(self.tasks) < self.max_tasks and self.used_mb + task.memory_mb <= self.memory_mb


@dataclass
class Group:
    """Identical devices of one pool: one model, one market, one region."""
    key: str
    cls: int
    kind: str
    region: str
    memory_mb: float
    bandwidth_gbps: float
    speed: float
    gpu_class: str
    policy: pricing.PricingPolicy
    preempt_rate: float
    price: float = 0.0
    load: float = 0.0


def spot_trace(s: Scenario, rng) -> np.ndarray:
    """Synkti's price trace: OU steps, a daily swing, clamped (the clamp does not
    feed back into the state); one sample per dt over the horizon."""
    p = s.spot
    n = int(round(s.horizon_h / p["dt_h"]))
    x, out = p["mean"], np.empty(n)
    noise = rng.standard_normal(n)
    lo, hi = p["floor"] * s.on_demand_price, p["cap"] * s.on_demand_price
    for k in range(n):
        t = k * p["dt_h"]
        x = x + p["theta"] * (p["mean"] - x) * p["dt_h"] + p["sigma"] * math.sqrt(p["dt_h"]) * noise[k]
        out[k] = min(hi, max(lo, x * (1 + p["daily_amplitude"] * math.sin(2 * math.pi * t / 24))))
    return out


class Simulation:
    def __init__(self, scenario: Scenario, variant: Variant | str, seed: int, record: bool = False,
                 keep_ledger: bool = True):
        self.s = scenario
        self.v = scenario.variant(variant) if isinstance(variant, str) else variant
        self.seed = seed
        self.record = record
        self.published = scenario.rules == "published"
        self.world_rng = np.random.default_rng([seed, 0])
        self.pre_rng = np.random.default_rng([seed, 1])
        self.order_rng = np.random.default_rng([seed, 2])
        self.q = EventQueue()
        self.ledger = Ledger(scenario.rules, keep=keep_ledger)
        self.policy = Policy(self.v, scenario)
        self.planner = PLANNERS[self.v.planner]
        self.instances: dict[str, Instance] = {}
        self.pending: list[Task] = []
        self.now = 0.0
        self.n_inst = 0
        self.stats = dict(preemptions=0, displaced=0, migrations=0, dropped=0, free_completions=0,
                          modes={}, batches=0, largest_batch=0)
        self.held_log: list[tuple[str, float, float]] = []   # (instance, held from, released at)
        self._open: dict[str, int] = {}                       # published: held_log index of live instances
        self.timings: list[tuple[str, int, float]] = []        # wall clock, kept out of the result
        self.tasks = self._draw_tasks()
        if scenario.world == "launch":
            self.trace = spot_trace(scenario, self.world_rng)
        else:
            self._build_pool()

    # --- world ---------------------------------------------------------------

    def _draw_tasks(self) -> list[Task]:
        s, rng = self.s, self.world_rng
        n = s.tasks
        shares = np.array([k.share for k in s.kinds], float)
        kinds = rng.choice(len(s.kinds), size=n, p=shares / shares.sum())
        arrivals = rng.uniform(0, s.arrival_frac * s.horizon_h, n)
        u = rng.random((n, 3))
        tasks = []
        for i in range(n):
            k = s.kinds[kinds[i]]
            work = k.work_h[0] + u[i, 0] * (k.work_h[1] - k.work_h[0])
            if k.state_mb_per_h is not None:
                state = min(k.state_mb_per_h * work, k.state_cap_mb)
            else:
                state = k.state_mb[0] + u[i, 1] * (k.state_mb[1] - k.state_mb[0])
            mem = state if k.memory_mb is None else max(state, k.memory_mb[0] + u[i, 2] * (k.memory_mb[1] - k.memory_mb[0]))
            deadline = None if k.deadline_factor is None else arrivals[i] + k.deadline_factor * work
            t = Task(i, k.name, float(arrivals[i]), float(work), float(state), float(mem),
                     k.checkpoint_interval_h, deadline)
            if self.record:
                t.legs = []
            tasks.append(t)
        for t in sorted(tasks, key=lambda t: t.arrival):
            self.q.push(t.arrival, "arrive", t)
        return tasks

    def _build_pool(self) -> None:
        from synord.hwprobe import known
        s, rng = self.s, self.world_rng
        ref = known.match(s.reference_model) if s.reference_model else None
        self.groups: dict[str, Group] = {}
        self.free: dict[str, dict[str, Instance]] = {}
        self.providers: list[list[Instance]] = []
        self.provider_region: list[str] = []
        self.provider_up: list[bool] = []
        self.unit_class: dict[str, str] = {}
        for ci, c in enumerate(s.classes):
            if c.model == "cpu":  # CPU slots (the sim-to-real mesh): priced like the daemon's cpu asks
                entry = {"slug": "cpu", "memory_bytes": c.memory_mb * MB}
                speed, rc = c.speed, "cpu"
                pol = pricing.PricingPolicy(preemptible_discount=s.spot_discount)
            else:
                entry = known.match(c.model)
                if entry is None or not entry.get("memory_bytes"):
                    raise ScenarioError(f"classes[{ci}].model {c.model!r} is not in hwprobe's known-device table")
                speed = entry["fp16_gflops"] / ref["fp16_gflops"] if ref else 1.0
                rc = "gpu"
                pol = pricing.PricingPolicy(watts_per_gpu=c.watts, depreciation_per_gpu_hour=c.depreciation_h,
                                            preemptible_discount=s.spot_discount)
            for kind in ("spot", "ondemand"):
                for r in c.regions:
                    key = f"{entry['slug']}/{kind}/{r}"
                    self.groups[key] = Group(key, ci, kind, r, entry["memory_bytes"] / MB, c.bandwidth_gbps,
                                             speed, entry["slug"], pol,
                                             s.preemption_rate_h if kind == "spot" else 0.0)
                    self.free[key] = {}
                    self.unit_class[key] = (rc, c.cores)
            kinds = rng.random(c.count) < c.spot_fraction
            regions = rng.integers(0, len(c.regions), c.count)
            for p in range(c.count):
                pid = len(self.providers)
                kind = "spot" if kinds[p] else "ondemand"
                g = self.groups[f"{entry['slug']}/{kind}/{c.regions[regions[p]]}"]
                units = [Instance(f"p{pid}.{u}", g.key, kind, g.region, g.memory_mb, g.bandwidth_gbps,
                                  0.0, speed, 1, provider=pid, slug=g.gpu_class) for u in range(c.gpus)]
                for u in units:
                    self.instances[u.id] = u
                    self.free[g.key][u.id] = u
                self.providers.append(units)
                self.provider_region.append(g.region)
                self.provider_up.append(True)
                if kind == "spot" and s.preemption_rate_h > 0:
                    t = rng.exponential(1 / s.preemption_rate_h)
                    while t < s.horizon_h:
                        self.q.push(t, "down", pid)
                        t += s.downtime_h + rng.exponential(1 / s.preemption_rate_h)
        for e in s.region_events:
            self.q.push(e.at_h, "region", e)
        for g in self.groups.values():
            g.price = self._unit_price(g, 1.0)

    def spot_price(self, t: float) -> float:
        """The first trace sample at or after t (Synkti's launch price)."""
        k = min(len(self.trace) - 1, math.ceil(t / self.s.spot["dt_h"] - 1e-9))
        return float(self.trace[k])

    # --- the run -------------------------------------------------------------

    def run(self) -> dict:
        self.q.push(self.s.horizon_h, "end")
        handlers = {"arrive": self._arrive, "complete": self._complete, "preempt": self._preempt,
                    "down": self._down, "up": self._up, "region": self._region}
        while True:
            ev = self.q.pop()
            if ev is None:
                break
            t, kind, data = ev
            self.now = t
            if kind == "end":
                break
            handlers[kind](data)
        return self._finish()

    def _arrive(self, task: Task) -> None:
        self._place([task])

    def _complete(self, data) -> None:
        task, version = data
        if task.done or (not self.published and version != task.version):
            return
        task.done, task.done_at = True, self.now
        inst = task.inst
        if inst is None:  # published defect: dropped from the pending list, finishes anyway
            self.stats["free_completions"] += 1
        self.ledger.task_completed(task, inst, self.now)
        if inst is not None:
            self._leave(task, inst)
            self._maybe_release(inst)
        if self.pending and self.s.world == "pool":
            self._drain()

    def _leave(self, task: Task, inst: Instance) -> None:
        inst.tasks.remove(task)
        inst.used_mb -= task.memory_mb
        task.inst = None
        if task.legs is not None:
            iid, t0, _ = task.legs[-1]
            task.legs[-1] = (iid, t0, self.now)

    def _maybe_release(self, inst: Instance) -> None:
        if self.published or inst.tasks or not inst.held:
            return  # Synkti never terminates an instance
        self._release(inst, self.now)
        if self.s.world == "pool" and self.provider_up[inst.provider]:
            self.free[inst.group][inst.id] = inst

    def _release(self, inst: Instance, end: float) -> None:
        inst.held = False
        self.ledger.instance_released(inst, end)
        self.held_log.append((inst.id, inst.held_since, end))

    # --- preemption ----------------------------------------------------------

    def _preempt(self, inst: Instance) -> None:
        """Launch world: a spot instance's notice (Synkti: its termination)."""
        if not inst.alive or (not self.published and not inst.held):
            return
        inst.alive = False
        self.stats["preemptions"] += 1
        displaced = self._displace(inst)
        if not self.published:
            self._release(inst, self.now + self.s.grace_s / 3600)
        else:
            self.held_log[self._open.pop(inst.id)] = (inst.id, inst.held_since, self.now)
        self._replace(displaced, inst)

    def _down(self, pid: int) -> None:
        if self.provider_up[pid]:
            self._replace(self._take_down(pid), None)

    def _take_down(self, pid: int) -> list[Task]:
        """A provider's notice: its devices leave the market until it is back;
        returns the tasks it displaced (not yet placed again)."""
        self.provider_up[pid] = False
        self.q.push(self.now + self.s.downtime_h, "up", pid)
        displaced = []
        for u in self.providers[pid]:
            self.free[u.group].pop(u.id, None)
            if u.held:
                self.stats["preemptions"] += 1
                displaced += self._displace(u)
                self._release(u, self.now + self.s.grace_s / 3600)
        return displaced

    def _up(self, pid: int) -> None:
        self.provider_up[pid] = True
        for u in self.providers[pid]:
            if not u.held:
                self.free[u.group][u.id] = u
        if self.pending:
            self._drain()

    def _region(self, ev) -> None:
        """A region-wide reclaim: a share of the region's spot providers at once."""
        pids = [p for p, r in enumerate(self.provider_region)
                if (r == ev.region or r.startswith(ev.region + "-"))  # "us" covers "us-east" and "us-west"
                and self.provider_up[p] and self.providers[p][0].kind == "spot"]
        chosen = pids[:int(round(ev.fraction * len(pids)))]
        displaced = [t for pid in chosen for t in self._take_down(pid)]
        t0 = time.perf_counter()
        self._replace(displaced, None)
        self.stats.setdefault("region_events", []).append(
            dict(at_h=self.now, region=ev.region, providers=len(chosen), displaced=len(displaced),
                 replaced=sum(1 for t in displaced if t.inst is not None)))
        self.timings.append(("region re-placement", len(displaced), time.perf_counter() - t0))

    def _displace(self, inst: Instance) -> list[Task]:
        """Stop every task of a preempted instance; keep what its checkpoint saves."""
        out = []
        bw_bps = inst.bandwidth_gbps * 125 * MB
        for task in list(inst.tasks):
            self._leave(task, inst)
            task.preemptions += 1
            task.displaced = True
            task.version += 1  # honest: its completion moves; published: ignored
            self.stats["displaced"] += 1
            if self.published:
                # Their decision runs, but tokens_completed never advances: whatever
                # the mode, the saved fraction of zero tokens is zero.
                mode, _ = decide_mode(bw_bps, self.s.grace_s, int(task.state_mb * MB), True, False)
                task.progress = task.saved = 0.0
            else:
                mode = self._checkpoint(task, inst, bw_bps)
            self.stats["modes"][mode] = self.stats["modes"].get(mode, 0) + 1
            out.append(task)
        return out

    def _checkpoint(self, task: Task, inst: Instance, bw_bps: float) -> str:
        ck = self.v.checkpoint
        ran = max(0.0, self.now - task.start)
        progress = min(task.work, task.progress + ran * inst.speed)
        if ck in ("periodic", "periodic+grace"):
            every = task.interval or self.s.checkpoint_interval_h
            task.saved = max(task.saved, task.progress + math.floor(ran / every) * every * inst.speed)
        if ck == "off":
            task.saved, mode = 0.0, "restart"
        elif ck == "periodic":
            mode = "restart-from-checkpoint" if task.saved > 0 else "restart"
        else:
            mode, _ = decide_mode(bw_bps, self.s.grace_s, int(task.state_mb * MB), True, task.saved > 0)
            if mode == "full":
                task.saved = progress
        task.progress = task.saved
        return mode

    # --- placement -----------------------------------------------------------

    def _replace(self, displaced: list[Task], gone: Instance | None) -> None:
        if not displaced:
            return
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(displaced))
        if self.published:
            self._published_migrate(displaced, gone)
        else:
            self._place(displaced)

    def _put(self, task: Task, inst: Instance) -> None:
        """Start (or resume) a task on an instance."""
        if not inst.held:
            inst.held, inst.held_since = True, self.now
            if self.s.world == "pool":
                self.free[inst.group].pop(inst.id, None)
                g = self.groups[inst.group]
                inst.price = g.price
        inst.tasks.append(task)
        inst.used_mb += task.memory_mb
        if task.displaced:
            task.migrations += 1
            self.stats["migrations"] += 1
            task.displaced = False
        task.inst = inst
        task.placed_at = self.now
        if task.legs is not None:
            task.legs.append((inst.id, self.now, None))
        if self.published:
            task.start = self.now
            remaining = task.work * (1 - task.saved / task.work)
            self.q.push(self.now + remaining, "complete", (task, task.version))
            return
        moved = task.state_mb * MB if task.saved > 0 else 0.0
        task.start = self.now + moved / (inst.bandwidth_gbps * 125 * MB) / 3600
        self.q.push(task.start + (task.work - task.progress) / inst.speed, "complete", (task, task.version))

    def _launch(self, kind: str) -> Instance:
        """Launch world: a new instance of the kind, price fixed at launch."""
        s = self.s
        self.n_inst += 1
        price = self.spot_price(self.now) if kind == "spot" else s.on_demand_price
        inst = Instance(f"i{self.n_inst}", kind, kind, "default", s.instance_memory_mb,
                        s.instance_bandwidth_gbps, price, 1.0, 1 << 30)
        self.instances[inst.id] = inst
        if kind == "spot":
            self.q.push(self.now + self.pre_rng.exponential(1 / s.spot["preemption_rate_h"]), "preempt", inst)
        if self.published:
            inst.held, inst.held_since = True, self.now  # held (never released) from launch
            self._open[inst.id] = len(self.held_log)
            self.held_log.append((inst.id, self.now, math.inf))
        return inst

    def _place(self, tasks: list[Task]) -> None:
        if self.published:
            self._assign_pending(tasks)
        elif self.s.world == "launch":
            self._place_launch(tasks)
        else:
            self.pending.extend(tasks)
            self._drain()

    def _running(self, exclude=None) -> list[Instance]:
        return [i for i in self.instances.values() if i.alive and i.held and i is not exclude]

    # honest, launch world: fill held instances through the planner, launch the rest
    def _place_launch(self, tasks: list[Task]) -> None:
        todo = list(tasks)
        while todo:
            cands = [i for i in self._running() if i.memory_mb - i.used_mb > 0]
            if not cands:
                break
            placed = self._plan(todo, cands, [i.kind for i in cands])
            if not placed:
                break
            todo = [t for t in todo if t.inst is None]
        for t in todo:
            kinds = self.policy.allowed_kinds(t, self.now)
            if self.v.policy == "market":
                g = self._launch_groups()
                best = self.policy.market_choice(t, self.now, g)
                kinds = tuple(k for k in ("spot", "ondemand") if k in best) or kinds
            self._put(t, self._launch(kinds[0]))

    def _launch_groups(self):
        s = self.s
        return [Group("spot", 0, "spot", "default", s.instance_memory_mb, s.instance_bandwidth_gbps, 1.0,
                      "gpu", None, s.spot["preemption_rate_h"], self.spot_price(self.now)),
                Group("ondemand", 0, "ondemand", "default", s.instance_memory_mb, s.instance_bandwidth_gbps,
                      1.0, "gpu", None, 0.0, s.on_demand_price)]

    def _plan(self, tasks: list[Task], slots_inst: list[Instance], slot_keys: list[str]) -> int:
        """Run the planner over tasks x slots with the policy's mask; place the
        assignments; returns how many were placed."""
        disp = [Displaced(str(t.id), 1.0, int(t.memory_mb * MB), "gpu",
                          int(t.state_mb * MB) if t.saved > 0 else 0) for t in tasks]
        slots = [Slot(i.id, 1.0, int((i.memory_mb - i.used_mb) * MB), i.price, i.bandwidth_gbps * 125 * MB,
                      ("gpu",)) for i in slots_inst]
        m = cost_matrix(disp, slots, self.s.price_weight)
        names = sorted(set(slot_keys))
        col = np.array([names.index(k) for k in slot_keys]) if len(names) > 1 else np.zeros(len(slot_keys), int)
        for r, t in enumerate(tasks):
            allowed = self._allowed(t)
            if allowed is not None:
                ok = np.array([k in allowed for k in names])
                m[r, ~ok[col]] = INFEASIBLE
        if not (m < INFEASIBLE).any():
            return 0
        result = self.planner(disp, slots, self.s.price_weight, matrix=m)
        n = 0
        for t in tasks:
            j = result.get(str(t.id))
            if j is not None and slots_inst[j].fits(t):
                self._put(t, slots_inst[j])
                n += 1
        return n

    def _allowed(self, task: Task):
        """Slot keys (launch world: kinds; pool: group keys) the task may take, None = any."""
        if self.s.world == "launch":
            if self.v.policy == "market" or "spot" in self.policy.allowed_kinds(task, self.now):
                return None  # filling a held instance of either kind costs nothing more
            return {"ondemand"}
        if self.v.policy == "market":
            groups = [g for g in self.groups.values() if self.free[g.key]]
            return self.policy.market_choice(task, self.now, groups)
        kinds = self.policy.allowed_kinds(task, self.now)
        return {k for k, g in self.groups.items() if g.kind in kinds}

    # honest, pool world: pending tasks against free devices, in batches
    def _drain(self) -> None:
        if not any(self.free.values()):
            return
        self._update_prices()
        lim = self.s.batch_limit
        waiting = self.pending
        self.pending = []
        for b in range(0, len(waiting), lim):
            chunk = waiting[b:b + lim]
            slots, keys = [], []
            for key, units in self.free.items():
                for k, u in enumerate(units.values()):
                    if k >= len(chunk):
                        break
                    slots.append(u)
                    keys.append(key)
            if slots:
                self._plan(chunk, slots, keys)
            self.pending.extend(t for t in chunk if t.inst is None)

    def _update_prices(self) -> None:
        """Spot prices follow the book (pricing.demand_multiplier over free devices
        and waiting tasks); on-demand prices are list prices."""
        waiting = len(self.pending)
        for g in self.groups.values():
            free = len(self.free[g.key])
            g.load = 0.0
            if g.kind == "spot":
                g.price = self._unit_price(g, pricing.demand_multiplier(g.policy, free, waiting))

    def _unit_price(self, g: Group, demand: float) -> float:
        """Price of one slot-hour: a device, or `cores` CPU cores (prices are per unit)."""
        rc, cores = self.unit_class[g.key]
        units = cores if rc == "cpu" else 1.0
        return units * pricing.unit_price(g.policy, rc, g.memory_mb * MB / pricing.GIB / units, demand,
                                          g.kind == "spot")

    # published: Synkti's assign_pending and migration, defects included
    def _assign_pending(self, tasks: list[Task]) -> None:
        running = self._running()
        order = [running[k] for k in self.order_rng.permutation(len(running))]
        free = {i.id: i.memory_mb - i.used_mb for i in order}   # stale: not updated in the pass
        chosen, launch = [], []
        for t in tasks:
            inst = next((i for i in order if free[i.id] >= t.memory_mb), None)
            (chosen.append((t, inst)) if inst is not None else launch.append(t))
        for t, inst in chosen:
            if inst.fits(t):
                self._put(t, inst)
            else:
                t.dropped = True   # silently dropped from the pending list
                self.stats["dropped"] += 1
        for t in launch:
            self._put(t, self._launch(self.policy.allowed_kinds(t, self.now)[0]))

    def _published_migrate(self, displaced: list[Task], gone: Instance) -> None:
        cands = self._running(exclude=gone)
        cands = [cands[k] for k in self.order_rng.permutation(len(cands))]
        if self.v.planner == "naive":
            plan = synkti_naive(displaced, cands, NAIVE_CAPACITY_MB)
        else:
            plan = synkti_km(displaced, cands, self.s.instance_bandwidth_gbps)
        rest = []
        for t in displaced:
            inst = plan.get(t.id)
            if inst is not None and inst.fits(t):
                self._put(t, inst)
            else:
                rest.append(t)
        self._assign_pending(rest)

    # --- end of run ----------------------------------------------------------

    def _finish(self) -> dict:
        s, end = self.s, self.s.horizon_h
        if not self.published:
            for inst in self.instances.values():
                if inst.held:
                    self._release(inst, end)
        done = [t for t in self.tasks if t.done]
        misses = sum(1 for t in self.tasks if t.deadline is not None and t.deadline <= end
                     and (not t.done or t.done_at > t.deadline + 1e-9))
        return dict(
            scenario=s.name, variant=self.v.name, policy=self.v.policy, planner=self.v.planner,
            checkpoint=self.v.checkpoint, rules=s.rules, seed=self.seed, cost=self.ledger.total,
            charged_hours=self.ledger.hours, tasks=len(self.tasks), completed=len(done),
            completed_work_h=sum(t.work for t in done), deadline_misses=misses,
            makespan_h=max((t.done_at for t in done), default=0.0),
            preemptions=self.stats["preemptions"], displaced=self.stats["displaced"],
            migrations=self.stats["migrations"], dropped=self.stats["dropped"],
            free_completions=self.stats["free_completions"], checkpoint_modes=dict(self.stats["modes"]),
            largest_batch=self.stats["largest_batch"], events=self.q.fired,
            region_events=self.stats.get("region_events", []))


def simulate(scenario: Scenario, variant, seed: int, **kw) -> dict:
    return Simulation(scenario, variant, seed, **kw).run()
