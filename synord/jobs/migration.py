"""Migration decisions, pure functions (no I/O): which checkpoint mode fits the
grace period, and which new provider each displaced task goes to.

Grace-period rule (per task):
    transferable = bandwidth × grace period
    ratio        = transferable / checkpoint size
    ratio ≥ full_threshold    → "full"     take a fresh checkpoint now and move it
    ratio ≥ partial_threshold → "partial"  move the newest periodic checkpoint we hold
    otherwise                 → "restart"  start again from the newest checkpoint we
                                           already hold, or from scratch

Re-placement of many tasks at once is an assignment problem: tasks × provider
slots, cost = checkpoint transfer time to that provider + price weight,
infinite where the task does not fit. Kuhn–Munkres (scipy's
linear_sum_assignment) gives the optimum; greedy first-fit is kept as the
baseline the benchmark compares against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

INFEASIBLE = 1e18  # stands for "infinite" in the cost matrix (scipy needs finite)


@dataclass(frozen=True)
class Thresholds:
    full: float = 0.8
    partial: float = 0.3


def decide_mode(bandwidth_bps: float, grace_s: float, checkpoint_bytes: int,
                checkpointable: bool, have_checkpoint: bool,
                thresholds: Thresholds = Thresholds()) -> tuple[str, float]:
    """(mode, ratio) for one task; see the module docstring."""
    if not checkpointable:
        return "restart", 0.0
    size = max(1, checkpoint_bytes)
    ratio = bandwidth_bps * max(0.0, grace_s) / size
    if ratio >= thresholds.full:
        return "full", ratio
    if ratio >= thresholds.partial and have_checkpoint:
        return "partial", ratio
    return "restart", ratio


@dataclass(frozen=True)
class Slot:
    """One task's worth of capacity at one provider."""
    provider: str
    cores: float
    memory: int
    price: float
    bandwidth_bps: float
    runtimes: tuple[str, ...]


@dataclass(frozen=True)
class Displaced:
    job_id: str
    cores: float
    memory: int
    runtime: str
    checkpoint_bytes: int
    max_price: float | None = None
    exclude: tuple[str, ...] = ()  # providers it must not go back to


def cost(task: Displaced, slot: Slot, price_weight: float = 1.0) -> float:
    if (slot.provider in task.exclude or task.runtime not in slot.runtimes
            or slot.cores + 1e-9 < task.cores or slot.memory < task.memory
            or (task.max_price is not None and slot.price > task.max_price)):
        return INFEASIBLE
    transfer_s = task.checkpoint_bytes / max(1.0, slot.bandwidth_bps)
    return transfer_s + price_weight * slot.price


def cost_matrix(tasks: Sequence[Displaced], slots: Sequence[Slot], price_weight: float = 1.0):
    import numpy as np
    m = np.empty((len(tasks), len(slots)))
    for i, t in enumerate(tasks):
        for j, s in enumerate(slots):
            m[i, j] = cost(t, s, price_weight)
    return m


def assign_optimal(tasks: Sequence[Displaced], slots: Sequence[Slot],
                   price_weight: float = 1.0, matrix=None) -> dict[str, int | None]:
    """job_id -> slot index (None where no slot fits), minimising the total cost."""
    from scipy.optimize import linear_sum_assignment
    if not tasks:
        return {}
    m = cost_matrix(tasks, slots, price_weight) if matrix is None else matrix
    result: dict[str, int | None] = {t.job_id: None for t in tasks}
    if not len(slots):
        return result
    rows, cols = linear_sum_assignment(m)
    for r, c in zip(rows, cols):
        if m[r, c] < INFEASIBLE:
            result[tasks[r].job_id] = int(c)
    return result


def assign_greedy(tasks: Sequence[Displaced], slots: Sequence[Slot],
                  price_weight: float = 1.0, matrix=None) -> dict[str, int | None]:
    """Baseline: each task in order takes the first free slot that fits."""
    taken: set[int] = set()
    result: dict[str, int | None] = {}
    for i, t in enumerate(tasks):
        result[t.job_id] = None
        for j, s in enumerate(slots):
            c = matrix[i, j] if matrix is not None else cost(t, s, price_weight)
            if j not in taken and c < INFEASIBLE:
                taken.add(j)
                result[t.job_id] = j
                break
    return result
