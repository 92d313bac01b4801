"""How soon `synord run` says it is waiting when no provider matches: seconds
from the command's start to its "submitted" line and to its "waiting for a
provider" line, against a consumer-only daemon alone (a real daemon, real
CLI processes). Promise (README): within a second of submitting.

    .venv/bin/python bench/bench_run_waiting.py [-n 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from jobs_helpers import CONSUMER_ONLY, PROBE_WASM, ensure_assets  # noqa: E402
from synord.localmesh import ROOT, SYNORD, DaemonCluster  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=5)
    n = ap.parse_args().n
    ensure_assets()
    submitted, waiting = [], []
    with tempfile.TemporaryDirectory() as tmp, DaemonCluster(Path(tmp)) as cluster:
        alone = cluster.start("alone", config=CONSUMER_ONLY + "[jobs]\nplacement_timeout_s = 2.0\n")
        for _ in range(n):
            t0 = time.monotonic()
            proc = subprocess.Popen([*SYNORD, "--home", str(alone.home), "run", str(PROBE_WASM)],
                                    stderr=subprocess.PIPE, text=True, cwd=ROOT)
            for line in proc.stderr:
                if line.endswith(" submitted\n"):
                    submitted.append(time.monotonic() - t0)
                elif "waiting for a provider" in line:
                    waiting.append(time.monotonic() - t0)
            proc.wait()
    gap = [w - s for s, w in zip(submitted, waiting)]
    print(f"command start -> 'submitted'          median {statistics.median(submitted):.3f} s  (n={n})")
    print(f"command start -> 'waiting for a provider' median {statistics.median(waiting):.3f} s")
    print(f"'submitted' -> 'waiting'              median {statistics.median(gap):.3f} s  "
          f"max {max(gap):.3f} s  (promise: < 1 s)")


if __name__ == "__main__":
    main()
