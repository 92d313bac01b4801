"""Jobs across a real mesh: command-to-output latency and artefact transfer throughput.

    .venv/bin/python bench/bench_jobs.py [-n 20] [--mib 256] [--only latency|transfer]

(a) latency: `synord run hello.wasm` against a 3-daemon loopback mesh (one
    consumer, two providers), timed as a subprocess from exec to exit, so CLI
    start-up, submission, negotiation, shipping, the run and the output stream
    are all in it. Baselines measured in the same run: `synord sandbox run` of
    the same module (local sandbox, no mesh) and bare `python -c pass`.
    Target: p50 <= 400 ms.
(b) transfer: a task whose artefact is a wasm module padded with a big custom
    section (legal wasm, ignored by the engine) is placed; the consumer's
    `msg="blob shipped" ... bytes=N s=SECONDS` log line gives the transfer
    time (offer -> last byte -> receiver hashed, fsynced and acked). Baseline
    in the same run: raw loopback TCP between two sockets sending the same
    bytes in 1 MiB writes, plus sha256 of them (the receiver's verification).
    Target: >= 150 MiB/s.

Every module here is built from WAT at run time; no test assets needed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from synord.localmesh import DaemonCluster, wait_for  # noqa: E402

CONSUMER_CONFIG = "[contributor]\nenabled = false\n"
HELLO_WAT = r'''
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello, wasm\0a")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 12))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
'''
SYNORD_BIN = Path(sys.executable).with_name("synord")
SYNORD = [str(SYNORD_BIN)] if SYNORD_BIN.exists() else [sys.executable, "-m", "synord.cli"]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def line(name: str, xs: list[float]) -> str:
    return (f"  {name:<46} p50 {pct(xs, .5) * 1e3:7.1f} ms   p90 {pct(xs, .9) * 1e3:7.1f} ms   "
            f"min {min(xs) * 1e3:6.1f} ms   (n={len(xs)})")


def timed(cmd: list[str], expect: str | None = None, cwd: Path = ROOT) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=120)
    dt = time.perf_counter() - t0
    if res.returncode != 0 or (expect is not None and res.stdout != expect):
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}): {res.stdout!r} {res.stderr[-2000:]}")
    return dt


def hello_module(path: Path, pad_bytes: int = 0) -> Path:
    import wasmtime
    data = bytes(wasmtime.wat2wasm(HELLO_WAT))
    with open(path, "wb") as f:
        f.write(data)
        if pad_bytes:
            # custom section: id 0, u32 LEB size, name (LEB len + bytes), payload
            name = b"synord.bench.padding"
            size = 1 + len(name) + pad_bytes
            f.write(b"\x00" + _leb(size) + _leb(len(name)) + name)
            left = pad_bytes
            while left:  # random: nothing along the way can compress or dedupe it
                n = min(left, 16 << 20)
                f.write(os.urandom(n))
                left -= n
    return path


def _leb(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def start_mesh(base: Path):
    cluster = DaemonCluster(base)
    consumer = cluster.start("consumer", config=CONSUMER_CONFIG)
    boot = consumer.p2p_addrs()
    provs = [cluster.start(f"p{i}", bootstrap=boot) for i in range(2)]
    ids = {p.status()["peer_id"] for p in provs}
    wait_for(lambda: {a["peer"] for a in consumer.get("/v1/book")["classes"].get("cpu", {})
                      .get("asks", [])} >= ids, 40, what="both providers' asks")
    return cluster, consumer, provs


# ---- (a) command to output ---------------------------------------------------------------

def bench_latency(consumer, work: Path, n: int) -> float:
    wasm = hello_module(work / "hello.wasm")
    run = [*SYNORD, "--home", str(consumer.home), "run", str(wasm)]
    local = [*SYNORD, "sandbox", "run", str(wasm)]
    bare = [sys.executable, "-c", "pass"]
    for _ in range(2):  # warm-up: page cache, the providers' compiled-module caches
        timed(run, "hello, wasm\n")
        timed(local, "hello, wasm\n")
    mesh, sandbox, python = [], [], []
    for _ in range(n):  # interleaved, so background load hits all three alike
        python.append(timed(bare))
        sandbox.append(timed(local, "hello, wasm\n"))
        mesh.append(timed(run, "hello, wasm\n"))
    print(f"(a) hello.wasm, command to output, subprocess wall time ({' '.join(SYNORD[-1:])})")
    print(line("python -c pass (interpreter start-up)", python))
    print(line("synord sandbox run hello.wasm (local, no mesh)", sandbox))
    print(line("synord run hello.wasm (3-daemon mesh)", mesh))
    p50 = pct(mesh, .5)
    print(f"  -> mesh p50 {p50 * 1e3:.1f} ms, target <= 400 ms: {'MET' if p50 <= 0.4 else 'MISSED'}; "
          f"mesh minus local sandbox (which imports wasmtime in the CLI process) {(p50 - pct(sandbox, .5)) * 1e3:+.1f} ms")
    return p50


# ---- (b) artefact transfer ---------------------------------------------------------------

def loopback_tcp(path: Path) -> float:
    """Seconds to push the file's bytes through a loopback TCP connection in 1 MiB writes."""
    size = path.stat().st_size
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    got = [0]

    def sink():
        conn, _ = srv.accept()
        buf = bytearray(1 << 20)
        with conn:
            while (k := conn.recv_into(buf)):
                got[0] += k
            conn.sendall(b"k")
    th = threading.Thread(target=sink)
    th.start()
    cli = socket.create_connection(srv.getsockname())
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            cli.sendall(block)
    cli.shutdown(socket.SHUT_WR)
    cli.recv(1)
    dt = time.perf_counter() - t0
    cli.close()
    th.join()
    srv.close()
    assert got[0] == size
    return dt


def sha256_time(path: Path) -> float:
    t0 = time.perf_counter()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return time.perf_counter() - t0


def shipped(consumer, job_id: str) -> dict | None:
    for ln in consumer.log().splitlines():
        if 'msg="blob shipped"' in ln and f"job={job_id}" in ln and "kind=artifact" in ln:
            return {k: v for k, v in re.findall(r"(\w+)=([^\s\"]+)", ln)}
    return None


def bench_transfer(consumer, work: Path, mib: int, rounds: int) -> float:
    print(f"(b) artefact transfer, consumer -> provider, {mib} MiB wasm module (padded custom section)")
    mesh_rates, e2e, tcp_rates, sha_rates = [], [], [], []
    for r in range(rounds):
        big = hello_module(work / f"big{r}.wasm", pad_bytes=mib << 20)  # fresh bytes: no cache hit
        size = big.stat().st_size
        tcp_rates.append(size / loopback_tcp(big) / 2**20)
        sha_rates.append(size / sha256_time(big) / 2**20)
        t0 = time.perf_counter()
        res = subprocess.run([*SYNORD, "--home", str(consumer.home), "run", str(big)],
                             capture_output=True, text=True, timeout=600, cwd=ROOT)
        dt = time.perf_counter() - t0
        if res.returncode != 0 or res.stdout != "hello, wasm\n":
            raise SystemExit(f"big task failed ({res.returncode}): {res.stderr[-2000:]}\n"
                             + consumer.log()[-3000:])
        job_id = re.search(r"job ([0-9a-f]+) submitted", res.stderr).group(1)
        rec = wait_for(lambda: shipped(consumer, job_id), 10, what="the blob shipped log line")
        assert int(rec["sent"]) == size, rec
        secs = float(rec["s"])
        mesh_rates.append(size / secs / 2**20)
        e2e.append(dt)
        print(f"  round {r + 1}: {size / 2**20:.0f} MiB shipped in {secs:.2f} s = {mesh_rates[-1]:6.1f} MiB/s"
              f"   (whole `synord run`: {dt:.2f} s = {size / dt / 2**20:.1f} MiB/s)")
        big.unlink()
    best = max(mesh_rates)
    print(f"  {'raw loopback TCP, same bytes, 1 MiB writes':<46} {statistics.median(tcp_rates):8.1f} MiB/s")
    print(f"  {'sha256 of the same bytes (receiver verifies)':<46} {statistics.median(sha_rates):8.1f} MiB/s")
    print(f"  {'synord blob transfer (blob shipped log line)':<46} {statistics.median(mesh_rates):8.1f} MiB/s"
          f"   (best {best:.1f})")
    print(f"  {'synord run end to end (hash+copy, ship, run)':<46} "
          f"{(mib << 20) / statistics.median(e2e) / 2**20:8.1f} MiB/s")
    med = statistics.median(mesh_rates)
    print(f"  -> median {med:.1f} MiB/s, target >= 150 MiB/s: {'MET' if med >= 150 else 'MISSED'}")
    return med


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20, help="runs for the latency figures")
    ap.add_argument("--mib", type=int, default=256, help="artefact size for the transfer")
    ap.add_argument("--rounds", type=int, default=3, help="transfers (each with fresh bytes)")
    ap.add_argument("--only", choices=["latency", "transfer"])
    ap.add_argument("--keep", action="store_true", help="keep the daemon homes and logs")
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    cluster = None
    try:
        work = base / "work"
        work.mkdir()
        cluster, consumer, _provs = start_mesh(base)
        print(f"mesh: 1 consumer + 2 providers on loopback ({os.cpu_count()} CPUs, load "
              f"{os.getloadavg()[0]:.2f})")
        if a.only in (None, "latency"):
            bench_latency(consumer, work, a.n)
        if a.only in (None, "transfer"):
            bench_transfer(consumer, work, a.mib, a.rounds)
    finally:
        if cluster:
            cluster.stop_all()
        if a.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
