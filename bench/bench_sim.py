"""Simulator runs too heavy for tests (issue 17).

  synkti  synkti-as-published and synkti-honest over --seeds worlds (200 by
          default): both tables, where the published single draw falls, the PNG
  hetero  the heterogeneous pool over --seeds worlds: planners, policies,
          checkpointing, paired comparisons with 95 % intervals
  scale   scale-week: 10 000 providers x 100 000 tasks, one simulated week, the
          daemon's market policy with the optimal planner: wall time, simulated
          events per second, the region-wide reclaim; then a cProfile summary of
          a one-tenth slice, and the three planners on that slice's reclaim

    .venv/bin/python bench/bench_sim.py synkti [--seeds 200] [--png synkti.png]
    .venv/bin/python bench/bench_sim.py hetero [--seeds 10] [--png hetero.png]
    .venv/bin/python bench/bench_sim.py scale
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from synord.sim import report, runner, scenario  # noqa: E402
from synord.sim.world import Simulation  # noqa: E402


def monte_carlo(names: list[str], seeds: int, png: str | None) -> None:
    results = []
    for name in names:
        t0 = time.perf_counter()
        s = scenario.load(name)
        r = runner.run_scenario(s, 0, seeds)
        ref = report.reference_table(name)
        if ref:
            r["published_draw"] = report.published_draw(r, ref)
        results.append(r)
        print(report.table(r))
        print(f"({len(s.variants)} variants x {seeds} seeds in {time.perf_counter() - t0:.0f} s)\n")
    if len(results) == 2:
        print(report.side_by_side(*results))
    if png:
        report.figure(results, png)
        print(f"figure: {png}")


def slice_of(s, k: int):
    return dataclasses.replace(s, tasks=s.tasks // k,
                               classes=tuple(dataclasses.replace(c, count=c.count // k) for c in s.classes))


def scale() -> None:
    s = scenario.load("scale-week")
    units = sum(c.count * c.gpus for c in s.classes)
    print(f"scale-week: {sum(c.count for c in s.classes)} providers ({units} devices), {s.tasks} tasks, "
          f"{s.horizon_h:.0f} h simulated")
    t0 = time.perf_counter()
    sim = Simulation(s, "Market-optimal", 0, keep_ledger=False)
    build = time.perf_counter() - t0
    r = sim.run()
    wall = time.perf_counter() - t0
    print(f"  Market-optimal: {wall:.0f} s wall ({build:.1f} s to draw the world), {r['events']} events, "
          f"{r['events'] / wall:.0f} events/s")
    print(f"  completed {r['completed']}/{r['tasks']}, cost ${r['cost']:.0f}, preemptions {r['preemptions']}, "
          f"displaced {r['displaced']}, migrations {r['migrations']}, deadline misses {r['deadline_misses']}, "
          f"largest batch {r['largest_batch']}")
    for ev, (_, n, secs) in zip(r["region_events"], sim.timings):
        print(f"  region reclaim at {ev['at_h']:.0f} h in {ev['region']}: {ev['providers']} providers, "
              f"{ev['displaced']} tasks displaced, {ev['replaced']} re-placed at once, assignment {secs:.2f} s")
    small = slice_of(s, 10)
    prof = cProfile.Profile()
    prof.enable()
    Simulation(small, "Market-optimal", 0, keep_ledger=False).run()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    print("\ncProfile of a one-tenth slice (1 000 providers x 10 000 tasks), by own time:")
    print("\n".join(line for line in out.getvalue().splitlines()[4:] if line.strip()))
    print("\nplanners on the one-tenth slice (same world, market policy):")
    for v in ("Market-optimal", "Market-greedy", "Market-naive"):
        sim = Simulation(small, v, 0, keep_ledger=False)
        r = sim.run()
        ev = r["region_events"][0]
        print(f"  {v:<15} cost ${r['cost']:.0f}  done {r['completed']}  reclaim: {ev['displaced']} displaced, "
              f"{ev['replaced']} re-placed, {sim.timings[0][2]:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["synkti", "hetero", "scale"])
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--png", default=None)
    a = ap.parse_args()
    if a.part == "synkti":
        monte_carlo(["synkti-as-published", "synkti-honest"], a.seeds or 200, a.png)
    elif a.part == "hetero":
        monte_carlo(["heterogeneous"], a.seeds or 10, a.png)
    else:
        scale()


if __name__ == "__main__":
    main()
