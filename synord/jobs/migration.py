"""Migration decisions, pure functions (no I/O): which checkpoint mode fits the
grace period (`decide_mode`, owned by the hand-over machine in
synord/protocols/handover.py), and which new provider each displaced task goes to.

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



class _Numpy:
    """numpy (16 MiB resident) on first use: an idle daemon never assigns displaced
    tasks, and imports this module on its job path (bench/bench_idle.py)."""

    def __getattr__(self, name: str):
        import numpy
        globals()["np"] = numpy
        return getattr(numpy, name)


np = _Numpy()

INFEASIBLE = float("inf")  # the task does not fit that slot


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
    """One pair's cost, the definition `cost_matrix` computes for all pairs at once."""
    if (slot.provider in task.exclude or task.runtime not in slot.runtimes
            or slot.cores + 1e-9 < task.cores or slot.memory < task.memory
            or (task.max_price is not None and slot.price > task.max_price)):
        return INFEASIBLE
    # Scalar arithmetic, the same operations as cost_matrix's: no numpy for one pair.
    return task.checkpoint_bytes * (1.0 / max(1.0, slot.bandwidth_bps)) + price_weight * slot.price


def _seconds_per_byte(bandwidth_bps):
    return 1.0 / np.maximum(1.0, bandwidth_bps)


def cost_matrix(tasks: Sequence[Displaced], slots: Sequence[Slot], price_weight: float = 1.0):
    """tasks × slots costs, `INFEASIBLE` (inf) where the task does not fit."""
    t_cores = np.array([t.cores for t in tasks], float)[:, None]
    t_mem = np.array([t.memory for t in tasks], float)[:, None]
    t_ckpt = np.array([t.checkpoint_bytes for t in tasks], float)[:, None]
    t_price = np.array([np.inf if t.max_price is None else t.max_price for t in tasks])[:, None]
    s_price = np.array([s.price for s in slots], float)
    fits = ((np.array([s.cores for s in slots], float) + 1e-9 >= t_cores)
            & (np.array([s.memory for s in slots], float) >= t_mem)
            & (s_price <= t_price))
    runtimes = sorted({t.runtime for t in tasks})
    offers = np.array([[r in s.runtimes for r in runtimes] for s in slots], bool).reshape(len(slots), -1)
    fits &= offers.T[[runtimes.index(t.runtime) for t in tasks]]
    providers = np.array([s.provider for s in slots], object)
    for i, t in enumerate(tasks):
        if t.exclude:
            fits[i] &= ~np.isin(providers, t.exclude)
    m = t_ckpt * _seconds_per_byte(np.array([s.bandwidth_bps for s in slots], float)) + price_weight * s_price
    m[~fits] = INFEASIBLE
    return m


def _dual_warm_start(tasks: Sequence[Displaced], slots: Sequence[Slot], price_weight: float):
    """Column potentials v that make the costs' own structure easy for the solver.

    cost = checkpoint_bytes_i × seconds_per_byte_j + price_j, a rank-one term plus
    a column term. Every task ranks the slots the same way (fastest link first),
    so a shortest-augmenting-path solver starting from zero potentials keeps
    re-routing earlier tasks: 1000×1000 took ~500 ms against ~35 ms on random
    costs. Without the fit constraints the optimum is a sort (most bytes on the
    fastest link) and its dual potentials have a closed form (adjacent pairs of
    the sorted matching bound v_{k+1} − v_k); subtracting them leaves reduced
    costs ≥ 0 that are zero along that sorted matching, so the solver mostly just
    confirms it and only re-routes where fit constraints interfere.
    Subtracting a per-column constant changes no optimum when every column is
    assigned, which is why the caller uses this only when tasks ≥ slots."""
    a = np.array([t.checkpoint_bytes for t in tasks], float)
    b = _seconds_per_byte(np.array([s.bandwidth_bps for s in slots], float))
    k = len(slots)
    A = np.sort(a)[::-1][:k]  # the k largest checkpoints meet the k slots
    order = np.argsort(b, kind="stable")
    B = b[order]
    steps = 0.5 * (A[1:] + A[:-1]) * np.diff(B)  # midway between the two adjacent bounds
    v = np.empty(k)
    v[order] = np.concatenate([[0.0], np.cumsum(steps)])
    return v + price_weight * np.array([s.price for s in slots], float)


def _interleave(x):
    """A fixed shuffle key that puts neighbours in ``x`` far apart: ranks spread by
    the golden-ratio stride (deterministic, so placements are repeatable)."""
    rank = np.empty(len(x))
    rank[np.argsort(x, kind="stable")] = np.arange(len(x))
    return (rank * 0.6180339887498949) % 1.0


def assign_optimal(tasks: Sequence[Displaced], slots: Sequence[Slot],
                   price_weight: float = 1.0, matrix=None) -> dict[str, int | None]:
    """job_id -> slot index (None where no slot fits), minimising the total cost
    over the largest number of tasks that can be placed at all."""
    result: dict[str, int | None] = {t.job_id: None for t in tasks}
    if not tasks or not slots:
        return result
    if len(tasks) == 1 and matrix is None:
        # One task: the optimum is its cheapest slot (the first, on a tie, as
        # argmin). Spares the solver and, in a lone hand-over, the first imports
        # of numpy (0.2-0.4 s on a 2-core box) and scipy.optimize (0.9 s).
        costs = [cost(tasks[0], s, price_weight) for s in slots]
        best = min(range(len(slots)), key=costs.__getitem__)
        result[tasks[0].job_id] = best if costs[best] < INFEASIBLE else None
        return result
    m = cost_matrix(tasks, slots, price_weight) if matrix is None else matrix
    feasible = m < INFEASIBLE
    if not feasible.any():
        return result
    if len(tasks) == 1:
        result[tasks[0].job_id] = int(np.argmin(m[0]))
        return result
    from scipy.optimize import linear_sum_assignment
    # Infeasible pairs get a finite penalty dearer than any whole feasible
    # assignment (scipy refuses inf when no full matching exists), so the
    # solver first places as many tasks as fit, then minimises their cost.
    lo, hi = m[feasible].min(), m[feasible].max()
    work = np.where(feasible, m - lo, (hi - lo) * (min(m.shape) + 1) + 1.0)
    if len(tasks) >= len(slots):
        work -= _dual_warm_start(tasks, slots, price_weight)
    # Row order changes no optimum, only the work (measured: bench_migration.py).
    a = np.array([t.checkpoint_bytes for t in tasks], float)
    fits = feasible.sum(axis=1)
    if len(tasks) == len(slots):
        # Warm-started and solved row by row: least constrained tasks first (they
        # settle on the zero-reduced-cost column of the sorted matching), and the
        # checkpoint sizes within one class interleaved, not sorted — rows sorted
        # by size keep displacing their neighbour under the rank-one cost.
        order = np.lexsort((_interleave(a), -fits))
    else:
        order = np.lexsort((-a, fits))
    rows, cols = linear_sum_assignment(work[order])
    for r, c in zip(order[rows], cols):
        if feasible[r, c]:
            result[tasks[r].job_id] = int(c)
    return result


def assign_greedy(tasks: Sequence[Displaced], slots: Sequence[Slot],
                  price_weight: float = 1.0, matrix=None) -> dict[str, int | None]:
    """Baseline: each task in order takes the first free slot that fits."""
    m = cost_matrix(tasks, slots, price_weight) if matrix is None else matrix
    taken: set[int] = set()
    result: dict[str, int | None] = {}
    for i, t in enumerate(tasks):
        result[t.job_id] = None
        for j in np.flatnonzero(m[i] < INFEASIBLE):
            if j not in taken:
                taken.add(int(j))
                result[t.job_id] = int(j)
                break
    return result
