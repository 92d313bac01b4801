"""Monte Carlo over seeds and paired comparisons on the same worlds."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .scenario import Scenario
from .world import Simulation

METRICS = ("cost", "savings", "completed", "preemptions", "displaced", "migrations", "deadline_misses",
           "makespan_h", "dropped", "free_completions", "charged_hours")


def run_scenario(s: Scenario, seed: int = 0, seeds: int = 1, curves: bool = True) -> dict:
    """Every variant on seeds seed .. seed+seeds-1; the first seed also keeps the
    cost-over-time curve of each variant."""
    runs: dict[str, list[dict]] = {v.name: [] for v in s.variants}
    curve: dict[str, list[float]] = {}
    grid = np.linspace(0, s.horizon_h, 97)
    base = s.baseline
    for k in range(seeds):
        sd = seed + k
        for v in s.variants:
            sim = Simulation(s, v, sd)
            r = sim.run()
            if curves and k == 0:
                curve[v.name] = [round(sim.ledger.cost_at(t), 4) for t in grid]
            runs[v.name].append(r)
        if base is not None:
            b = runs[base.name][-1]["cost"]
            for v in s.variants:
                r = runs[v.name][-1]
                r["savings"] = 1 - r["cost"] / b if b > 0 else float("nan")
    out = dict(scenario=s.name, description=s.description, rules=s.rules, world=s.world,
               seed=seed, seeds=seeds, baseline=base.name if base else None,
               variants={}, paired=paired(s, runs), curves=dict(t_h=[round(t, 3) for t in grid], cost=curve))
    for v in s.variants:
        rs = runs[v.name]
        agg = {m: summary([r[m] for r in rs if m in r]) for m in METRICS if any(m in r for r in rs)}
        modes: dict[str, int] = {}
        for r in rs:
            for mode, n in r["checkpoint_modes"].items():
                modes[mode] = modes.get(mode, 0) + n
        out["variants"][v.name] = dict(policy=v.policy, planner=v.planner, checkpoint=v.checkpoint,
                                       tasks=s.tasks, checkpoint_modes=modes, metrics=agg,
                                       costs=[round(r["cost"], 4) for r in rs],
                                       region_events=rs[0]["region_events"] if rs else [])
    return out


def summary(xs) -> dict:
    a = np.asarray(xs, float)
    if a.size == 0:
        return {}
    return dict(mean=float(a.mean()), p5=float(np.percentile(a, 5)), p95=float(np.percentile(a, 95)),
                sd=float(a.std(ddof=1)) if a.size > 1 else 0.0)


def _pairs(s: Scenario):
    vs = s.variants
    for i, a in enumerate(vs):
        for b in vs[i + 1:]:
            diff = sum(getattr(a, f) != getattr(b, f) for f in ("policy", "planner", "checkpoint"))
            if diff == 1 and "ondemand" not in (a.policy, b.policy):
                yield a, b


def paired(s: Scenario, runs: dict) -> list[dict]:
    """Cost of A minus cost of B on the same seeds: mean, 95 % t-interval, and
    the share of worlds where A is cheaper."""
    from scipy import stats
    out = []
    for a, b in _pairs(s):
        d = np.array([ra["cost"] - rb["cost"] for ra, rb in zip(runs[a.name], runs[b.name])])
        n = d.size
        if n == 0:
            continue
        mean = float(d.mean())
        half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
        out.append(dict(a=a.name, b=b.name, n=n, mean_diff=mean, ci95=[mean - half, mean + half],
                        a_cheaper_share=float((d < 0).mean()),
                        verdict=_verdict(a.name, b.name, mean, half)))
    return out


def _verdict(a: str, b: str, mean: float, half: float) -> str:
    if math.isnan(half):
        return "one seed: no interval"
    if mean + half < 0:
        return f"{a} cheaper"
    if mean - half > 0:
        return f"{b} cheaper"
    return "no significant difference"


def main(args) -> int:
    """`synord sim`: run, print tables (or one JSON document), write the PNG."""
    import json
    import sys

    from . import report
    from .scenario import ScenarioError, load
    if args.seeds < 1 or args.seed < 0:
        raise ScenarioError("--seeds must be >= 1 and --seed >= 0")
    results = []
    for src in args.scenario:
        s = load(src)
        if args.variant:
            wanted = set(args.variant)
            unknown = wanted - {v.name for v in s.variants}
            if unknown:
                raise ScenarioError(f"scenario {s.name}: no variant {sorted(unknown)[0]!r}")
            keep = [v for v in s.variants if v.name in wanted or v is s.baseline]
            s = dataclasses.replace(s, variants=tuple(keep))
        print(f"running {s.name}: {len(s.variants)} variant(s) x {args.seeds} seed(s)", file=sys.stderr)
        r = run_scenario(s, args.seed, args.seeds)
        ref = report.reference_table(src)
        if ref:
            r["published_draw"] = report.published_draw(r, ref)
        results.append(r)
    if args.png:
        try:
            report.figure(results, args.png)
        except OSError as exc:
            raise ScenarioError(f"cannot write {args.png}: {exc.strerror or exc}") from None
    if args.json:
        print(json.dumps({"results": results, "png": args.png}, default=float))
        return 0
    for r in results:
        print(report.table(r))
        print()
    if len(results) == 2:
        print(report.side_by_side(*results))
    if args.png:
        print(f"figure: {args.png}")
    return 0
