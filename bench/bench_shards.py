"""Sharded jobs on a real loopback mesh: one task on the whole input vs N shards.

    .venv/bin/python bench/bench_shards.py [--mib 16] [--shards 1,2,4] [--rounds 3] [--smoke]

A consumer-only daemon and max(N) providers. The job is busybox `tr a-z A-Z`
in a container over a text input of ``--mib`` MiB, run with
`synord run --shards N --input FILE` (N = 1 is one task on the whole input)
and timed as a subprocess from exec to exit: splitting, hashing, placing the
shards together, shipping each shard, the runs and the gathered output are
all in it. Every run's output is checked byte for byte against the input
upper-cased. Printed: the median wall time per N and the speed-up over N = 1.
On a 2-core machine the providers share the same cores, so the speed-up is
the overlap of shipping and start-up, not of compute.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from synord.localmesh import SYNORD, DaemonCluster, wait_for  # noqa: E402  (the daemons' own command)

BUSYBOX = ROOT / "tests" / "assets" / "build" / "images" / "busybox"


def make_input(path: Path, mib: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog, line %08d\n"
    n = max(4, (mib << 20) // len(line % 0))
    data = b"".join(line % i for i in range(n))
    path.write_bytes(data)
    return data


def run_once(consumer, data_path: Path, expected: bytes, shards: int) -> float:
    cmd = [*SYNORD, "--home", str(consumer.home), "run", "--shards", str(shards), "--input", str(data_path),
           "--runtime", "container", "--cpus", "0.25", "--memory", "64M", str(BUSYBOX), "--", "tr", "a-z", "A-Z"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, cwd=ROOT, timeout=600)
    dt = time.perf_counter() - t0
    if res.returncode != 0 or res.stdout != expected:
        raise SystemExit(f"--shards {shards}: exit {res.returncode}, output "
                         f"{'differs' if res.stdout != expected else 'ok'}: {res.stderr.decode()[-1000:]}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--shards", default="1,2,4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="1 MiB, 1 and 2 shards, one round")
    a = ap.parse_args()
    if a.smoke:
        a.mib, a.shards, a.rounds = 1, "1,2", 1
    counts = [int(x) for x in a.shards.split(",")]
    if not BUSYBOX.exists():
        subprocess.run(["bash", str(ROOT / "tests" / "assets" / "build.sh")], check=True)
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp, DaemonCluster(Path(tmp)) as cluster:
        data_path = Path(tmp) / "input.txt"
        expected = make_input(data_path, a.mib).upper()
        consumer = cluster.start("consumer", config="[contributor]\nenabled = false\n")
        boot = consumer.p2p_addrs()
        provs = [cluster.start(f"p{i}", bootstrap=boot) for i in range(max(counts))]
        ids = {p.status()["peer_id"] for p in provs}
        wait_for(lambda: {x["peer"] for x in consumer.get("/v1/book")["classes"].get("cpu", {})
                          .get("asks", [])} >= ids, 60, what="every provider's ask")
        run_once(consumer, data_path, expected, len(provs))  # warm-up: the image on every provider
        times = {n: [] for n in counts}
        for _ in range(a.rounds):
            for n in counts:  # interleaved: background load hits every N alike
                times[n].append(run_once(consumer, data_path, expected, n))
        base = statistics.median(times[counts[0]])
        print(f"busybox tr a-z A-Z over {a.mib} MiB, {len(provs)} providers, {a.rounds} round(s), "
              f"`synord run --shards N` exec to exit (output checked byte for byte)")
        for n in counts:
            med = statistics.median(times[n])
            print(f"  N={n:<3} median {med:7.2f} s   min {min(times[n]):7.2f} s   "
                  f"speed-up vs N={counts[0]}: {base / med:4.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
