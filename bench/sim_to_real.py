"""Sim-to-real check (issue 17): the same small scenario in the simulator and
on a real loopback mesh of daemons, side by side.

Scenario `sim-to-real` (synord/sim/scenarios/sim-to-real.toml): 4 providers of
one half-core slot each, 12 checkpointable WASM counter tasks submitted at
once, providers p0 and p1 paused (`POST /v1/pause`: the preemption notice,
full checkpoint, hand-back) on the scenario's schedule and resumed after its
downtime.  Time is compressed: a simulated hour is a real second.  The task's
work is measured first (one reference run in a local sandbox, wall time); the
simulator runs at that pace and again at the pace tasks actually had on the
mesh (this host is shared), so that what remains is scheduling and hand-over.

    .venv/bin/python bench/sim_to_real.py [--count 30] [--work 30000000] [--speed 1.0]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from jobs_helpers import COUNTER_WASM, CONSUMER_ONLY, ensure_assets, start_mesh  # noqa: E402
from synord.localmesh import SYNORD, DaemonCluster  # noqa: E402
from synord.sim import scenario  # noqa: E402
from synord.sim.world import Simulation  # noqa: E402

SLOTS_CORES = 0.5


def reference_seconds(env: dict) -> float:
    args = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
    t0 = time.monotonic()
    subprocess.run([*SYNORD, "sandbox", "run", *args, str(COUNTER_WASM)], cwd=ROOT,  # exit code = the task's
                   capture_output=True, timeout=600)
    return time.monotonic() - t0


def simulate(s) -> dict:
    sim = Simulation(s, s.variants[0], 0)
    r = sim.run()
    return dict(price=r["cost"] / r["charged_hours"] if r["charged_hours"] else float("nan"),
                cost=r["cost"] / 3600, slot_s=r["charged_hours"], completed=r["completed"],
                migrations=r["migrations"], preemptions=r["preemptions"], makespan_s=r["makespan_h"])


def real(s, env: dict, tmp: Path) -> dict:
    cpus = os.cpu_count() or 1
    provider_config = f"[contributor]\ncpu_share = {SLOTS_CORES / cpus:.6f}\n"
    consumer_config = CONSUMER_ONLY + "[jobs]\nplacement_timeout_s = 900\n"
    spec = {"artifact": str(COUNTER_WASM), "runtime": "wasm", "args": [], "cpus": SLOTS_CORES,
            "memory_bytes": 64 << 20, "max_price": None, "timeout_s": None, "checkpointable": True, "env": env}
    with DaemonCluster(tmp) as cluster:
        consumer, provs = start_mesh(cluster, len(s.classes), consumer_config=consumer_config,
                                     provider_config=provider_config)
        by_region = {c.regions[0]: p for c, p in zip(s.classes, provs)}
        schedule = sorted([(e.at_h, "pause", by_region[e.region]) for e in s.region_events]
                          + [(e.at_h + s.downtime_h, "resume", by_region[e.region]) for e in s.region_events],
                          key=lambda x: x[0])
        t0 = time.time()
        ids = [consumer.post("/v1/jobs", spec)["id"] for _ in range(s.tasks)]
        preemptions, jobs = 0, {}
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            now = time.time() - t0
            while schedule and schedule[0][0] <= now:
                _, what, p = schedule.pop(0)
                res = p.post(f"/v1/{what}")
                if what == "pause":
                    preemptions += res.get("tasks_handed_back", 0)
            jobs = {i: consumer.get(f"/v1/jobs/{i}") for i in ids}
            if not schedule and all(j["state"] in ("succeeded", "failed", "cancelled") for j in jobs.values()):
                break
            time.sleep(0.5)
        legs = [leg for j in jobs.values() for leg in j["history"]]
        ends = [leg["end"] for leg in legs if leg.get("end")]
        return dict(
            cost=sum(leg["price"] * SLOTS_CORES * ((leg.get("end") or time.time()) - leg["start"]) / 3600
                     for leg in legs),
            slot_s=sum((leg.get("end") or time.time()) - leg["start"] for leg in legs),
            # the counter exits with a code of its own (not 0): a task is complete when its last leg exited
            completed=sum(bool(j["history"]) and j["history"][-1].get("ended") == "exit" for j in jobs.values()),
            migrations=sum(max(0, len(j["history"]) - 1) for j in jobs.values()),
            preemptions=preemptions, makespan_s=(max(ends) - t0) if ends else float("nan"),
            placement_s=min(leg["start"] for leg in legs) - t0 if legs else float("nan"),
            price=(sum(leg["price"] for leg in legs) / len(legs) * SLOTS_CORES) if legs else float("nan"),
            whole_leg_s=_mean([leg["end"] - leg["start"] for j in jobs.values() if len(j["history"]) == 1
                               for leg in j["history"] if leg.get("end")]))


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=30, help="counter steps per task")
    ap.add_argument("--work", type=int, default=30_000_000, help="inner iterations per step")
    ap.add_argument("--speed", type=float, default=1.0,
                    help="slot speed vs the reference run (the counter is light: ~2 s CPU in 10 s wall, "
                         "so four at once on 2 cores keep their pace)")
    a = ap.parse_args()
    ensure_assets()
    env = {"COUNT": str(a.count), "WORK": str(a.work)}
    work = reference_seconds(env)
    base = scenario.load("sim-to-real")

    def with_work(w: float):
        return dataclasses.replace(base, kinds=tuple(dataclasses.replace(k, work_h=(w, w)) for k in base.kinds),
                                   classes=tuple(dataclasses.replace(c, speed=a.speed) for c in base.classes))

    print(f"task: counter.wasm {a.count} steps x {a.work} iterations = {work:.1f} s alone "
          f"(`synord sandbox run`, start-up included)")
    sim = simulate(with_work(work))
    with tempfile.TemporaryDirectory(prefix="sim2real-") as tmp:
        rl = real(with_work(work), env, Path(tmp))
    # This host is shared: the pace of a task on the mesh is measured too, and the
    # simulator run again with it, so what is left is scheduling, not CPU weather.
    paced = simulate(with_work(rl["whole_leg_s"])) if rl["whole_leg_s"] == rl["whole_leg_s"] else sim
    print(f"{'':<22}{'sim (alone pace)':>18}{'sim (mesh pace)':>18}{'real mesh':>12}")
    for key, label, fmt in (("completed", "completed", "{:.0f}"), ("preemptions", "tasks preempted", "{:.0f}"),
                            ("migrations", "migrations", "{:.0f}"), ("makespan_s", "makespan s", "{:.1f}"),
                            ("slot_s", "slot-seconds held", "{:.0f}"), ("cost", "cost $", "{:.5f}")):
        print(f"{label:<22}{fmt.format(sim[key]):>18}{fmt.format(paced[key]):>18}{fmt.format(rl[key]):>12}")
    print(f"{'cost $ at mesh price':<22}{sim['slot_s'] * rl['price'] / 3600:>18.5f}"
          f"{paced['slot_s'] * rl['price'] / 3600:>18.5f}{rl['cost']:>12.5f}")
    print(f"prices per slot-hour: mesh ${rl['price']:.4f}, simulator ${sim['price']:.4f}")
    print(f"real: first task started {rl['placement_s']:.1f} s after submission (the simulator places at once); "
          f"an unmoved task ran {rl['whole_leg_s']:.1f} s on the mesh against {work:.1f} s alone")

if __name__ == "__main__":
    main()
