"""`synord sim`: determinism, invariants of every run, the as-published
defects reproduced on purpose, the honest rules differing where they should,
and the CLI.  Small worlds, so the whole file runs in seconds."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections import defaultdict

import pytest

from daemons import ROOT
from synord.sim import scenario as sc
from synord.sim.world import Simulation

SMALL = dict(tasks=60, horizon_h=48.0)


def small(name: str, **kw) -> sc.Scenario:
    return dataclasses.replace(sc.load(name), **{**SMALL, **kw})


def hetero() -> sc.Scenario:
    s = sc.load("heterogeneous")
    classes = tuple(dataclasses.replace(c, count=max(2, c.count // 4)) for c in s.classes)
    return dataclasses.replace(s, tasks=80, horizon_h=36.0, classes=classes,
                               region_events=(sc.RegionEvent(18.0, "us", 1.0),))


def run(s, variant, seed=1):
    sim = Simulation(s, variant, seed, record=True)
    return sim, sim.run()


def test_same_seed_same_run_other_seed_other_world():
    for name, variant in (("synkti-as-published", "Greedy-KM"), ("synkti-honest", "Fallback-Naive")):
        s = small(name)
        a, b = Simulation(s, variant, 7).run(), Simulation(s, variant, 7).run()
        assert a == b
        assert Simulation(s, variant, 8).run()["cost"] != a["cost"]
    s = hetero()
    assert Simulation(s, "Market-optimal", 3).run() == Simulation(s, "Market-optimal", 3).run()


def check_invariants(sim: Simulation, result: dict) -> None:
    held = defaultdict(list)
    for iid, t0, t1 in sim.held_log:
        held[iid].append((t0, t1))
    # A task is on one instance at a time, and only while that instance is held.
    for t in sim.tasks:
        legs = [(i, t0, sim.s.horizon_h if t1 is None else t1) for i, t0, t1 in t.legs]
        for (_, _, end), (_, start, _) in zip(legs, legs[1:]):
            assert end <= start + 1e-9, f"task {t.id} on two instances at once"
        for iid, t0, t1 in legs:
            assert any(h0 - 1e-9 <= t0 and t1 <= h1 + 1e-9 for h0, h1 in held[iid]), \
                f"task {t.id} ran on {iid} while it was not held"
        if t.done:
            assert not legs or legs[-1][2] <= t.done_at + 1e-9
    # Capacity (memory and task count) is never exceeded on any instance.
    per_inst = defaultdict(list)
    for t in sim.tasks:
        for iid, t0, t1 in t.legs:
            per_inst[iid].append((t0, 1, t.memory_mb))
            per_inst[iid].append((sim.s.horizon_h if t1 is None else t1, -1, -t.memory_mb))
    for iid, evs in per_inst.items():
        inst, n, mem = sim.instances[iid], 0, 0.0
        for _, dn, dm in sorted(evs, key=lambda e: (e[0], e[1])):  # leaving before arriving
            n, mem = n + dn, mem + dm
            assert n <= inst.max_tasks and mem <= inst.memory_mb + 1e-6, f"{iid} over capacity"
    # Every billed hour belongs to an instance held, and the ledger adds up to the cost.
    for c in sim.ledger.lines:
        if c.instance is not None:
            assert any(h0 - 1e-9 <= c.start_h and c.end_h <= h1 + 1e-9 for h0, h1 in held[c.instance])
        assert c.end_h >= c.start_h
    assert sum(c.amount for c in sim.ledger.lines) == pytest.approx(result["cost"], rel=1e-12, abs=1e-9)
    if sim.s.rules == "honest":  # each held interval billed exactly once, at its own price
        billed = sorted((c.instance, c.start_h, c.end_h) for c in sim.ledger.lines)
        assert billed == sorted(sim.held_log)
    assert result["completed"] == sum(t.done for t in sim.tasks)


@pytest.mark.parametrize("name,variant", [
    ("synkti-as-published", "Greedy-Naive"), ("synkti-as-published", "Fallback-KM"),
    ("synkti-honest", "Greedy-KM"), ("synkti-honest", "Fallback-Naive"),
    ("synkti-honest", "UniformProgress-KM"), ("synkti-honest", "Market-KM"),
    ("synkti-honest", "Greedy-KM-off"), ("heterogeneous", "Market-optimal"),
    ("heterogeneous", "Greedy-naive"), ("heterogeneous", "Market-optimal-off")])
def test_invariants_hold_in_every_world(name, variant):
    s = hetero() if name == "heterogeneous" else small(name)
    sim, r = run(s, variant)
    assert r["preemptions"] > 0 and r["completed"] > 0
    check_invariants(sim, r)


def preempted_done(sim):
    return [t for t in sim.tasks if t.preemptions and t.done]


def test_as_published_keeps_its_defects():
    s = sc.load("synkti-as-published")  # the full 200 tasks: drops need a crowd
    sim, r = run(s, "Greedy-KM", seed=2)
    hit = preempted_done(sim)
    assert hit
    for t in hit:
        # Completion never moves: first start + duration, whatever happened.
        assert t.done_at == pytest.approx(t.legs[0][1] + t.work)
        # Time before the preemption is never billed: at most the last stretch is.
        charged = sum(c.end_h - c.start_h for c in sim.ledger.lines if c.task == t.id and c.instance)
        ran = sum(t1 - t0 for _, t0, t1 in t.legs)
        assert charged == pytest.approx(0.0 if t.dropped else t.legs[-1][2] - t.legs[-1][1])
        assert charged < ran - 1e-6
    # Tasks dropped by the stale fit check finish anyway, for nothing.
    free = {t.id for t in sim.tasks if t.done and t.dropped}
    assert r["free_completions"] == len(free) >= 1
    assert all(c.amount == 0 for c in sim.ledger.lines if c.task in free)
    # Co-located tasks each pay the whole instance price: more hours billed than instances were held.
    assert r["charged_hours"] > sum(min(s.horizon_h, h1) - h0 for _, h0, h1 in sim.held_log)


def test_honest_rules_differ_where_they_should():
    s = small("synkti-honest")
    off, r_off = run(s, "Greedy-KM-off", seed=2)
    hit = preempted_done(off)
    assert hit
    for t in hit:  # work is lost: the completion moves past first start + duration
        assert t.done_at > t.legs[0][1] + t.work + 1e-6
    grace, r_grace = run(s, "Greedy-KM", seed=2)
    for t in preempted_done(grace):  # a full checkpoint keeps the work: only transfer time is added
        ran = sum(t1 - t0 for _, t0, t1 in t.legs)
        assert ran == pytest.approx(t.work, abs=0.01)
    assert set(r_grace["checkpoint_modes"]) == {"full"} and set(r_off["checkpoint_modes"]) == {"restart"}
    assert r_grace["free_completions"] == 0 and r_grace["dropped"] == 0
    # Same world under published rules: the bill is per task, so it differs.
    pub = Simulation(small("synkti-as-published"), "Greedy-KM", 2).run()
    assert pub["cost"] != pytest.approx(r_grace["cost"])


def test_grace_decisions_follow_bandwidth_and_checkpoint_size():
    """RTX 4090s behind a 0.5 Gbit/s uplink move 7.5 GB in a 120 s grace period:
    small states go whole, mid-size ones fall back to the last periodic
    checkpoint, large ones restart (decide_mode's thresholds 0.8 / 0.3)."""
    raw = {"world": "pool", "rules": "honest", "horizon_h": 24, "reference_model": "GeForce RTX 4090",
           "preemption": {"rate_h": 0.5, "downtime_h": 0.5},
           "classes": [{"model": "GeForce RTX 4090", "count": 30, "gpus": 1, "spot_fraction": 1.0,
                        "bandwidth_gbps": 0.5, "regions": ["eu"]}],
           "tasks": {"count": 60, "arrival_frac": 0.2},
           "kinds": [{"work_h": [3, 6], "state_mb": [1000, 24000], "memory_mb": [1000, 24000]}],
           "variants": [{"name": "g", "policy": "greedy", "planner": "optimal", "checkpoint": "periodic+grace"},
                        {"name": "grace-only", "policy": "greedy", "checkpoint": "grace"}]}
    s = sc.parse(raw)
    modes = Simulation(s, "g", 1).run()["checkpoint_modes"]
    assert modes.get("full") and modes.get("partial") and modes.get("restart"), modes
    only = Simulation(s, "grace-only", 1).run()["checkpoint_modes"]
    assert "partial" not in only and only.get("full") and only.get("restart")  # no periodic checkpoint to fall back on


def test_region_event_displaces_many_at_once_and_they_are_replaced():
    raw = {"world": "pool", "rules": "honest", "horizon_h": 30, "reference_model": "L40S",
           "preemption": {"rate_h": 0.0, "downtime_h": 10, "events": [{"at_h": 5, "region": "us", "fraction": 1.0}]},
           "classes": [{"model": "L40S", "count": 40, "gpus": 2, "spot_fraction": 1.0, "bandwidth_gbps": 25,
                        "regions": ["us"]},
                       {"model": "H100 SXM5 80GB", "count": 20, "gpus": 4, "spot_fraction": 0.0,
                        "bandwidth_gbps": 100, "regions": ["eu"]}],
           "tasks": {"count": 70, "arrival_frac": 0.1},
           "kinds": [{"work_h": [8, 12], "state_mb": [1000, 40000]}],
           "variants": [{"name": v, "policy": "market", "planner": v} for v in ("optimal", "greedy", "naive")]}
    s = sc.parse(raw)
    for v in ("optimal", "greedy", "naive"):
        sim, r = run(s, v)
        (ev,) = r["region_events"]
        assert ev["providers"] == 40 and ev["displaced"] == r["displaced"] == r["largest_batch"] > 10
        assert ev["replaced"] == ev["displaced"]  # 80 H100s on demand take them all, in one batch
        assert r["completed"] == 70
        check_invariants(sim, r)


def sim_cli(*args):
    return subprocess.run([sys.executable, "-m", "synord.cli", "sim", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_cli_json_and_errors(tmp_path):
    png = tmp_path / "sim.png"
    res = sim_cli("--scenario", "synkti-honest", "--variant", "Greedy-KM", "--seeds", "2", "--json", "--png", str(png))
    assert res.returncode == 0, res.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(res.stdout)
    (r,) = doc["results"]
    assert set(r["variants"]) == {"Greedy-KM", "OnDemandOnly"} and r["seeds"] == 2
    assert len(r["variants"]["Greedy-KM"]["costs"]) == 2
    assert r["variants"]["OnDemandOnly"]["metrics"]["savings"]["mean"] == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('world = "pool"\nrules = "published"\n')
    res = sim_cli("--scenario", str(bad))
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "published" in res.stderr
    res = sim_cli("--scenario", "no-such")
    assert res.returncode == 1 and "built-in" in res.stderr and "Traceback" not in res.stderr


def test_cli_import_path_stays_light():
    code = "import sys, synord.cli; print(sorted(m for m in ('numpy', 'matplotlib', 'scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
