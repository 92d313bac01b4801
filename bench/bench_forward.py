"""`synord forward`: a forwarded port against a direct loopback connection, same run.

* forwarded: real daemons (a consumer and a provider, two processes); busybox
  httpd runs in a container task exposing port 8080; `synord forward` listens
  on the consumer's loopback. Each HTTP request crosses the consumer daemon,
  a libp2p stream (TCP, Noise, yamux), the provider daemon and a socket made
  in the sandbox's net namespace.
* direct: the same busybox httpd binary serving the same file on the host's
  127.0.0.1 (the baseline).

Figures: throughput of one GET of a --mib file (MiB/s, best of --rounds), and
the request/response round trip of a small GET (each on a new connection, as
busybox httpd closes after one answer: p50/p99 over --requests). No targets.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_forward.py [--mib 32] [--rounds 3] [--requests 200]
    ... --smoke: the smallest run that walks every path
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout, not an installed copy
sys.path.insert(0, str(ROOT / "tests"))

MiB = 1 << 20


def get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        n = 0
        while chunk := resp.read(1 << 20):
            n += len(chunk)
        assert resp.status == 200, resp.status
        return n
    finally:
        conn.close()


def measure(port: int, size: int, rounds: int, requests: int) -> tuple[float, float, float]:
    """(MiB/s best of rounds, p50 ms, p99 ms)."""
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        got = get(port, "/big")
        assert got == size, f"port {port}: {got} of {size} bytes"
        best = max(best, size / MiB / (time.perf_counter() - t0))
    times = []
    for _ in range(requests):
        t0 = time.perf_counter()
        get(port, "/index.html")
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    return best, statistics.median(times), p99


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_answer(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            get(port, "/index.html")
            return
        except (OSError, http.client.HTTPException, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=32, help="at most 60: the task's /tmp is a 64 MiB tmpfs")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--smoke", action="store_true", help="1 MiB, 1 round, 5 requests")
    a = ap.parse_args()
    if a.smoke:
        a.mib, a.rounds, a.requests = 1, 1, 5
    from synord.runtimes.container import ContainerRuntime
    avail = ContainerRuntime().available()
    if not avail.available or os.geteuid() != 0 or not shutil.which("busybox"):
        print(f"skipped: needs containers ({avail.reason or 'ok'}), a root daemon and busybox on the host")
        return 0
    from daemons import SYNORD, DaemonCluster
    from jobs_helpers import BUSYBOX_DIR, ensure_assets, start_mesh, submit, wait_job
    ensure_assets()
    size = a.mib * MiB
    serve = (f"mkdir -p /tmp/www && echo hello > /tmp/www/index.html && head -c {size} /dev/zero > /tmp/www/big"
             " && exec httpd -f -p 8080 -h /tmp/www")
    with tempfile.TemporaryDirectory(prefix="bench-forward-") as tmp:
        www = Path(tmp) / "www"
        www.mkdir()
        (www / "index.html").write_text("hello\n")
        with open(www / "big", "wb") as f:
            f.truncate(size)
        port = free_port()
        direct = subprocess.Popen(["busybox", "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", str(www)])
        fwd = None
        try:
            with DaemonCluster(Path(os.environ.get("BENCH_DIR") or tmp) / "mesh") as cluster:
                consumer, _ = start_mesh(cluster, 1)
                job_id = submit(consumer, "--runtime", "container", "--memory", f"{max(256, 2 * a.mib + 64)}M",
                                "--port", "8080", str(BUSYBOX_DIR), "--", "sh", "-c", serve)
                wait_job(consumer, job_id, states=("running",), timeout=120)
                fwd = subprocess.Popen([*SYNORD, "--home", str(consumer.home), "forward", "--json", job_id, "8080"],
                                       stdout=subprocess.PIPE, text=True, cwd=ROOT)
                local = json.loads(fwd.stdout.readline())["local"]
                wait_answer(local)
                wait_answer(port)
                d_mib, d_p50, d_p99 = measure(port, size, a.rounds, a.requests)
                f_mib, f_p50, f_p99 = measure(local, size, a.rounds, a.requests)
                consumer.cli("cancel", job_id)
        finally:
            for p in (fwd, direct):
                if p is not None and p.poll() is None:
                    p.terminate()
                    p.wait(timeout=30)
    print(f"throughput, one GET of {a.mib} MiB (best of {a.rounds}): forwarded {f_mib:.1f} MiB/s, "
          f"direct loopback {d_mib:.1f} MiB/s ({f_mib / d_mib * 100:.1f} %)")
    print(f"round trip, GET of a small file on a new connection ({a.requests} requests): "
          f"forwarded p50 {f_p50:.2f} ms p99 {f_p99:.2f} ms; direct p50 {d_p50:.2f} ms p99 {d_p99:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
