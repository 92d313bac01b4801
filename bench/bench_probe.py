"""How long `hwprobe.probe()` takes (promise: < 2 s without --bench) and
what --bench measures, beside baselines measured in the same run.

    .venv/bin/python bench/bench_probe.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from synord import hwprobe  # noqa: E402
from synord.hwprobe import bench as hb  # noqa: E402


def timed_subprocess(args: list[str], runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *args], cwd=REPO, check=True, capture_output=True)
        best = min(best, time.perf_counter() - t0)
    return best


def median_time(fn, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    print("hwprobe timings (best of 3 for processes, median of 5 in-process)")
    base = timed_subprocess(["-c", "pass"])
    print(f"  baseline: python start-up                  {base * 1000:8.1f} ms")
    imp = timed_subprocess(["-c", "import pyopencl, pynvml; from synord import hwprobe"])
    print(f"  baseline: import hwprobe+pyopencl+pynvml   {imp * 1000:8.1f} ms")
    cold = timed_subprocess(["-m", "synord.hwprobe", "--json"])
    print(f"  python -m synord.hwprobe --json (whole process)   {cold * 1000:8.1f} ms   target < 2000 ms")
    warm = median_time(lambda: hwprobe.probe())
    print(f"  probe() in a running process               {warm * 1000:8.1f} ms")
    prof = hwprobe.probe()
    ref = median_time(lambda: hwprobe.refresh_dynamic(prof), runs=10)
    print(f"  refresh_dynamic()                          {ref * 1000:8.1f} ms")
    t0 = time.perf_counter()
    benched = hwprobe.probe(bench=True)
    print(f"  probe(bench=True)                          {(time.perf_counter() - t0) * 1000:8.1f} ms")
    print("measured vs peak FP32 GFLOPS:")
    for d in benched.devices:
        tp = d["throughput"]
        if tp["measured_fp32_gflops"] is not None or tp["fp32_gflops"] is not None:
            print(f"  {d['kind']:<7} {d['model'][:40]:<40} peak {tp['fp32_gflops']!s:>9} ({tp['source']})"
                  f"  measured {tp['measured_fp32_gflops']!s:>8}")
    print(f"  baseline: numpy sgemm 512^2                {hb.numpy_sgemm_gflops(n=512):8.1f} GFLOPS")


if __name__ == "__main__":
    main()
