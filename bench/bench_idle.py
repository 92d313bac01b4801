"""Idle cost of a synord daemon: CPU and memory with nothing to do, by mesh size.

Starts N real daemons on loopback (synord.localmesh: one bootstrap, the others
find each other by peer exchange), lets them settle, then measures over a
window, per daemon and all its processes (the daemon runs in its own session:
the container reaper and any other helper count too):

* CPU: utime+stime from /proc/PID/stat at both ends of the window;
* memory: RSS and PSS (/proc/PID/smaps_rollup) summed over the processes.

Baseline in the same run: N bare py-libp2p hosts (Noise, yamux, GossipSub on
one topic, nothing else) connected the same way, measured the same way.  p2pd
(go-libp2p) is used too when it is on PATH.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_idle.py [--sizes 1,10,40] [--settle 20] [--window 30]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = {"cpu_pct": 0.3, "rss_mib": 80.0}
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- /proc ---------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields from 3 (state) on


def session_pids(sid: int) -> list[int]:
    """Every live process of the session ``sid`` (a daemon started with start_new_session)
    and every descendant of it (a helper may start a session of its own)."""
    parent, session = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat(int(entry))
            if f is not None:
                parent[int(entry)], session[int(entry)] = int(f[1]), int(f[3])  # fields 4, 6
    out = {pid for pid, s in session.items() if s == sid}
    grew = True
    while grew:
        new = {pid for pid, pp in parent.items() if pp in out and pid not in out}
        out |= new
        grew = bool(new)
    return sorted(out)


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        f = _stat(pid)
        if f is not None:
            total += int(f[11]) + int(f[12])  # fields 14, 15: utime, stime
    return total


def memory_kib(pids: list[int]) -> tuple[int, int]:
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            pass
    return rss, pss


def measure(groups: dict[str, int], window: float) -> dict[str, dict]:
    """groups: name -> session id. CPU % of one core over the window, memory at its end."""
    pids = {name: session_pids(sid) for name, sid in groups.items()}
    t0 = time.monotonic()
    start = {name: cpu_ticks(p) for name, p in pids.items()}
    time.sleep(window)
    elapsed = time.monotonic() - t0
    out = {}
    for name, sid in groups.items():
        p = session_pids(sid)
        rss, pss = memory_kib(p)
        ticks = cpu_ticks(p) - start[name]
        out[name] = {"cpu_pct": 100.0 * ticks / CLK_TCK / elapsed, "rss_mib": rss / 1024,
                     "pss_mib": pss / 1024, "procs": len(p)}
    return out


# -- the baseline: a bare py-libp2p host ---------------------------------------
def bare_host(bootstrap: list[str]) -> None:
    """Run as a child: a py-libp2p host with our transports, one GossipSub topic, idle."""
    import multiaddr
    import trio
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
    from libp2p.pubsub.pubsub import Pubsub
    from libp2p.tools.anyio_service import background_trio_service

    async def main() -> None:
        host = new_host(key_pair=create_new_key_pair())
        router = GossipSub(protocols=[PROTOCOL_ID_V11], degree=4, degree_low=3, degree_high=8,
                           heartbeat_interval=1)
        pubsub = Pubsub(host, router)
        listen = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
        async with background_trio_service(pubsub), background_trio_service(router):
            async with host.run([listen]):
                await pubsub.subscribe("synord/caps/1")
                for addr in bootstrap:
                    await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(addr)))
                addr = f"{host.get_addrs()[0]}"
                if "/p2p/" not in addr:
                    addr += f"/p2p/{host.get_id().to_base58()}"
                print(addr, flush=True)
                await trio.sleep_forever()

    trio.run(main)


def start_baseline(n: int, fanout: list[int]) -> list[subprocess.Popen]:
    """n bare hosts; host i dials ``fanout[i]`` earlier hosts (our daemons' connection count)."""
    procs, addrs = [], []
    for i in range(n):
        targets = addrs[max(0, i - fanout[i]):i] if i else []
        p = subprocess.Popen([sys.executable, __file__, "--bare-host", *targets], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, cwd=ROOT, start_new_session=True)
        procs.append(p)
        addrs.append(p.stdout.readline().strip())
    return procs


def start_p2pd(n: int) -> list[subprocess.Popen]:
    procs = []
    for i in range(n):
        procs.append(subprocess.Popen(["p2pd", f"-listen=/unix/{tempfile.mktemp(prefix='p2pd-')}",
                                       "-hostAddrs=/ip4/127.0.0.1/tcp/0", "-pubsub"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def summary(results: dict[str, dict]) -> dict:
    vals = list(results.values())
    return {"cpu_pct_median": round(statistics.median(v["cpu_pct"] for v in vals), 3),
            "cpu_pct_max": round(max(v["cpu_pct"] for v in vals), 3),
            "rss_mib_median": round(statistics.median(v["rss_mib"] for v in vals), 1),
            "pss_mib_median": round(statistics.median(v["pss_mib"] for v in vals), 1),
            "procs": max(v["procs"] for v in vals)}


def run_size(n: int, settle: float, window: float, tmp: Path) -> dict:
    from synord.localmesh import DaemonCluster
    row: dict = {"n": n}
    with DaemonCluster(tmp / f"n{n}") as cluster:
        first = cluster.start("d0")
        boot = first.p2p_addrs()[:1]
        for i in range(1, n):
            cluster.spawn(f"d{i}", bootstrap=boot)
        for d in cluster.daemons:
            d.wait_ready(timeout=60 + 2 * n)
        time.sleep(settle)
        conns = [sum(1 for p in d.get("/v1/peers") if p.get("connected")) for d in cluster.daemons]
        row["connections_mean"] = round(statistics.mean(conns), 1)
        res = measure({d.name: d.pid for d in cluster.daemons}, window)
        row["synord"] = summary(res)
    # the baseline with the same number of connections per host (roughly: each dials
    # as many earlier hosts as our daemons ended up with, halved: connections go both ways)
    per = max(1, round(row["connections_mean"] / 2)) if n > 1 else 0
    procs = start_baseline(n, [per] * n)
    try:
        time.sleep(min(settle, 10))
        row["bare_libp2p"] = summary(measure({f"b{i}": p.pid for i, p in enumerate(procs)}, window))
    finally:
        stop(procs)
    if shutil.which("p2pd"):
        procs = start_p2pd(n)
        try:
            time.sleep(min(settle, 5))
            row["p2pd"] = summary(measure({f"p{i}": p.pid for i, p in enumerate(procs)}, window))
        finally:
            stop(procs)
    return row


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--bare-host":
        bare_host(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,10,40", help="mesh sizes, comma-separated")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds after start before measuring")
    ap.add_argument("--window", type=float, default=30.0, help="seconds of measurement")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        for n in (int(x) for x in args.sizes.split(",")):
            row = run_size(n, args.settle, args.window, Path(tmp))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nper daemon, all its processes; window {args.window:.0f} s after {args.settle:.0f} s settle; "
          f"CPU in % of one core; load {os.getloadavg()[0]:.1f}")
    print("N    conns  synord CPU med/max   RSS   PSS  procs | bare py-libp2p CPU  RSS  PSS"
          + ("  | p2pd CPU  RSS" if shutil.which("p2pd") else ""))
    for r in rows:
        s, b = r["synord"], r["bare_libp2p"]
        line = (f"{r['n']:<4} {r['connections_mean']:>5}  {s['cpu_pct_median']:>7.3f}/{s['cpu_pct_max']:<7.3f}"
                f"  {s['rss_mib_median']:>5}  {s['pss_mib_median']:>5}  {s['procs']:>3}  |"
                f"  {b['cpu_pct_median']:>14.3f}  {b['rss_mib_median']:>5}  {b['pss_mib_median']:>5}")
        if "p2pd" in r:
            line += f"  | {r['p2pd']['cpu_pct_median']:>7.3f}  {r['p2pd']['rss_mib_median']:>5}"
        print(line)
    one = rows[0]["synord"]
    print(f"\ntargets: one idle daemon <= {TARGETS['cpu_pct']} % CPU and <= {TARGETS['rss_mib']} MiB RSS "
          f"(incl. helpers); per-daemon CPU flat across N")
    ok = one["cpu_pct_median"] <= TARGETS["cpu_pct"] and one["rss_mib_median"] <= TARGETS["rss_mib"]
    print("verdict (N=%d):" % rows[0]["n"], "meets targets" if ok else "MISSES targets")


if __name__ == "__main__":
    main()
