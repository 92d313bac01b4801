"""Every benchmark runs to its end in a short smoke mode, so none can rot
unnoticed (bench_microvm.py once failed on every run for weeks). No speed is
asserted here: the figures belong to the bench scripts themselves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

# script -> the smallest arguments that still walk every code path it has
SMOKE_ARGS: dict[str, list[str]] = {
    "bench_container.py": ["-n", "2"],
    "bench_dht.py": ["--smoke"],
    "bench_exec.py": ["--rounds", "2"],
    "bench_forward.py": ["--smoke"],
    "bench_gang.py": ["--rounds", "1", "--sizes", "2"],
    "bench_gossip.py": ["--sizes", "3", "--msgs", "3", "--bare-sizes", "3"],
    "bench_idle.py": ["--sizes", "1,2", "--settle", "1", "--window", "1"],
    "bench_jobs.py": ["-n", "2", "--mib", "8", "--rounds", "1"],
    "bench_market.py": ["--orders", "2000", "--envelopes", "100", "--repeat", "1"],
    "bench_microvm.py": ["1"],
    "bench_nat.py": ["--smoke"],
    "bench_migration.py": ["--rounds", "1"],
    "bench_placement.py": ["-n", "3", "--warmup", "1"],
    "bench_probe.py": [],
    "bench_sim.py": ["synkti", "--seeds", "3"],
    "bench_stalled_streams.py": ["--streams", "8"],
    "bench_transfer.py": ["--mib", "2", "--rounds", "1"],
    "sim_to_real.py": ["--count", "4", "--work", "2000000"],
    "bench_run_waiting.py": ["-n", "1"],
    "bench_shards.py": ["--smoke"],
    "bench_wasm.py": ["-n", "5", "--against", "HEAD"],
}

# not benchmarks of their own: processes a bench script starts (run by its smoke run)
BENCH_CHILDREN = {"bare_gossip_peer.py": "bench_gossip.py"}


def test_every_bench_script_has_a_smoke_run():
    scripts = {p.name for p in BENCH.glob("*.py")} - set(BENCH_CHILDREN)
    assert scripts == set(SMOKE_ARGS), "give each bench/ script its smoke arguments here"
    assert set(BENCH_CHILDREN.values()) <= set(SMOKE_ARGS)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE_ARGS))
def test_bench_runs_to_the_end(script):
    r = subprocess.run([sys.executable, str(BENCH / script), *SMOKE_ARGS[script]], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{script} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert r.stdout.strip(), f"{script} printed no figures"
