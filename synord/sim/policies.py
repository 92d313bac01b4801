"""Decisions of one run: which market a task may use, and which slot it gets.

Policies (which kind of capacity a task may take):
  greedy            spot only (Synkti's Greedy)
  fallback          spot, on-demand once a task was preempted >= N times (OnDemandFallback)
  ondemand          on-demand only: the baseline
  uniform-progress  deadline-aware: spot while the task's progress is at or above the
                    straight line from arrival to deadline with a safety margin left,
                    on-demand when it falls behind (Wu et al., "Can't Be Late", NSDI '24)
  market            the daemon's market: the task's bid matched against one ask per
                    capacity group by `synord.market.matching.match` (constraints,
                    price-time, router score); a spot group's reputation is the chance
                    of finishing without preemption

Planners (which slot each task gets, given the allowed ones) all run on the
daemon's own cost (`synord.jobs.migration.cost_matrix`: checkpoint transfer time
plus price weight x price):
  naive    `assign_greedy`: first slot that fits, in slot order
  greedy   cheapest slot first, tasks with the largest checkpoint choosing first
  optimal  `assign_optimal`: Kuhn–Munkres, most tasks placed, then least total cost

Synkti's own planners, kept only for the as-published replica (their defects
included, see ../../shared/notes/synkti-scenario.md §3): `synkti_naive`,
`synkti_km`.
"""

from __future__ import annotations

import math

import numpy as np

from synord.protocols.orders import Ask, Bid
from synord.jobs.migration import INFEASIBLE, assign_greedy, assign_optimal
from synord.market.matching import match
from synord.market.router import PeerInfo, Router

FAR = 1 << 62  # expiry that never comes in a simulated run


def assign_cheapest(tasks, slots, price_weight: float = 1.0, matrix=None) -> dict[str, int | None]:
    """Greedy on cost: tasks by checkpoint size (largest first) each take their
    cheapest free slot; the baseline between first-fit and the optimum."""
    result: dict[str, int | None] = {t.job_id: None for t in tasks}
    m = np.array(matrix, float, copy=True)
    order = sorted(range(len(tasks)), key=lambda i: -tasks[i].checkpoint_bytes)
    for i in order:
        j = int(np.argmin(m[i]))
        if m[i, j] < INFEASIBLE:
            result[tasks[i].job_id] = j
            m[:, j] = INFEASIBLE
    return result


PLANNERS = {"naive": assign_greedy, "greedy": assign_cheapest, "optimal": assign_optimal}


class Policy:
    def __init__(self, variant, scenario, router: Router | None = None):
        self.v = variant
        self.s = scenario
        self.router = router or Router()
        self.max_price = scenario.max_price
        self._asks: dict = {}

    def allowed_kinds(self, task, now: float) -> tuple[str, ...]:
        p = self.v.policy
        if p == "greedy":
            return ("spot",)
        if p == "ondemand":
            return ("ondemand",)
        if p == "fallback":
            return ("ondemand",) if task.preemptions >= self.v.fallback_after else ("spot",)
        if p == "uniform-progress":
            return ("spot",) if self.on_track(task, now) else ("ondemand",)
        return ("spot", "ondemand")  # market: the match decides among groups

    def on_track(self, task, now: float) -> bool:
        if task.deadline is None:
            return True
        span = task.deadline - task.arrival
        expected = task.work * min(1.0, (now - task.arrival) / span) if span > 0 else task.work
        remaining = task.work - task.progress
        margin = task.interval or self.s.checkpoint_interval_h  # work a preemption may cost
        return task.progress >= expected and (task.deadline - now) - remaining >= margin

    def ask(self, g) -> Ask:
        """A group's ask, rebuilt only when its price or load changed."""
        key = (g.key, g.price, g.load)
        a = self._asks.get(g.key)
        if a is None or a[0] != key:
            a = (key, Ask(id="g", seq=0, resource_class="gpu", cores=1.0, memory=int(g.memory_mb * 1e6),
                          price=g.price, expires=FAR, runtimes=("wasm",), gpus=1, gpu_class=g.gpu_class,
                          preemptible=g.kind == "spot", region=None, load=g.load, perf=g.speed, peer=g.key))
            self._asks[g.key] = a
        return a[1]

    def market_choice(self, task, now: float, groups) -> set:
        """Keys of the groups the daemon's matcher ranks best for this task
        (ties within 0.02 of the top score): ``groups`` are objects with key,
        kind, price, memory_mb, speed, region, load, gpu_class, preempt_rate."""
        asks = [self.ask(g) for g in groups]
        remaining_h = max(0.0, task.work - task.progress)
        mp = self.max_price if self.max_price is not None else 2.0 * max((g.price for g in groups), default=1.0)
        bid = Bid(id="t", seq=0, resource_class="gpu", cores=1.0, memory=int(task.memory_mb * 1e6),
                  runtime="wasm", max_price=mp, duration_s=int(min(remaining_h * 3600, 366 * 86400 - 1)),
                  deadline=0, expires=FAR, gpus=1)
        by_key = {g.key: g for g in groups}

        def info(peer: str) -> PeerInfo:
            g = by_key[peer]
            return PeerInfo(reputation=math.exp(-g.preempt_rate * remaining_h / max(g.speed, 1e-9)))

        res = match(bid, asks, now=0, peer_info=info, router=self.router, shortlist=len(asks))
        if not res.candidates:
            return set()
        top = res.candidates[0].score
        return {c.ask.peer for c in res.candidates if c.score >= top - 0.02}


# --- Synkti's planners, defects included (as-published mode only) -------------

def synkti_naive(tasks, instances, naive_capacity_mb: float) -> dict:
    """Each task in turn to the first instance whose free memory, counted against
    24 x 1024 MB (not the 24 x 1000 used everywhere else), is enough; usage tracked."""
    used = {i.id: i.used_mb for i in instances}
    out = {}
    for t in tasks:
        for inst in instances:
            if naive_capacity_mb - used[inst.id] >= t.memory_mb:
                used[inst.id] += t.memory_mb
                out[t.id] = inst
                break
    return out


def synkti_km(tasks, instances, bandwidth_gbps: float) -> dict:
    """Their "optimal": cost kv / (Gbps x 125) s x 1000 as integers, infeasible
    and padding at 1e9, solved by a *maximising* Kuhn–Munkres; matches to
    infeasible or padding entries are thrown away; one task per instance."""
    from scipy.optimize import linear_sum_assignment
    if not tasks or not instances:
        return {}
    n = max(len(tasks), len(instances))
    w = np.full((n, n), 1e9)
    feasible = np.zeros((n, n), bool)
    for a, t in enumerate(tasks):
        for b, inst in enumerate(instances):
            if inst.memory_mb - inst.used_mb >= t.memory_mb:
                w[a, b] = int(t.memory_mb / (bandwidth_gbps * 125.0) * 1000)
                feasible[a, b] = True
    rows, cols = linear_sum_assignment(w, maximize=True)
    return {tasks[a].id: instances[b] for a, b in zip(rows, cols)
            if a < len(tasks) and b < len(instances) and feasible[a, b]}
