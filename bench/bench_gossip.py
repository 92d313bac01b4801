"""Capability-announcement gossip: reach-all latency, delivery ratio, idle RSS.

Starts N mesh peer processes (tests/meshd.py: the daemon's MeshService code,
py-libp2p, Noise, yamux, GossipSub) on loopback; one is the bootstrap, every
other knows only it (peer exchange does the rest).  Then peers take turns
publishing signed caps announcements; each receiver logs when the envelope
passed validation.  Reach-all latency of one announcement = last receiver's
time - publish time (one clock: same machine).  N=2 (one hop) runs first as the
baseline of the same run.

    .venv/bin/python bench/bench_gossip.py [--sizes 2,10,30] [--msgs 60] [--rate 5] [--bare-sizes 10]

The baseline for issue 20's "within 2x" is a mesh of bare py-libp2p hosts
(bench/bare_gossip_peer.py: GossipSub with the same degree, none of our code)
at the same N, in the same run; p2pd (go) is not packaged for this box.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
MESHD = [sys.executable, str(ROOT / "tests" / "meshd.py")]
BARE = [sys.executable, str(ROOT / "bench" / "bare_gossip_peer.py")]
LOGDIR = Path(tempfile.mkdtemp(prefix="bench-gossip-"))
TARGETS = {"p50_ms": 60.0, "p99_ms": 400.0, "delivery": 1.0, "rss_mib": 120.0}


class Peer:
    def __init__(self, proc: trio.Process):
        self.proc = proc
        self.peer_id = ""
        self.addrs: list[str] = []
        self.replies, self._replies_recv = trio.open_memory_channel(100)

    async def send(self, cmd: str) -> None:
        await self.proc.stdin.send_all(cmd.encode() + b"\n")

    async def ask(self, cmd: str, timeout: float = 30.0) -> dict:
        await self.send(cmd)
        with trio.fail_after(timeout):
            return await self._replies_recv.receive()


async def read_lines(peer: Peer, recvs: list, sent: list, ready: trio.Event) -> None:
    buf = b""
    while True:
        chunk = await peer.proc.stdout.receive_some(65536)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            kind = ev.get("ev")
            if kind == "recv":
                recvs.append((peer.peer_id, ev["from"], ev["seq"], ev["t"]))
            elif kind == "sent":
                sent.append((peer.peer_id, ev["seq"], ev["t"]))
            elif kind == "ready":
                peer.peer_id, peer.addrs = ev["peer_id"], ev["addrs"]
                ready.set()
            else:
                await peer.replies.send(ev)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def run_size(n: int, msgs: int, rate: float, bare: bool = False) -> dict:
    """N synord mesh peers (tests/meshd.py), or with ``bare`` N bare py-libp2p
    hosts (bench/bare_gossip_peer.py), each dialling every earlier one."""
    recvs: list = []
    sent: list = []
    peers: list[Peer] = []
    async with trio.open_nursery() as nursery:
        async def spawn(extra: list[str]) -> Peer:
            log = open(LOGDIR / f"{'bare' if bare else 'meshd'}-n{n}-{len(peers)}.log", "wb")
            proc = await trio.lowlevel.open_process((BARE if bare else MESHD) + extra, stdin=-1, stdout=-1, stderr=log,
                                                    cwd=ROOT)
            peer = Peer(proc)
            ready = trio.Event()
            nursery.start_soon(read_lines, peer, recvs, sent, ready)
            peers.append(peer)
            return peer, ready
        try:
            t0 = time.monotonic()
            boot, ready = await spawn([])
            with trio.fail_after(60):
                await ready.wait()
            waits = []
            for _ in range(n - 1):  # a little apart, as real nodes join
                dial = peers if bare else [boot]  # bare hosts have no peer exchange
                waits.append((await spawn([a for p in dial for a in ("--bootstrap", p.addrs[0])]))[1])
                if bare:  # the next one dials this one: it must be listening
                    with trio.fail_after(60):
                        await waits[-1].wait()
                await trio.sleep(0.2)
            with trio.fail_after(180):
                for w in waits:
                    await w.wait()
                while True:  # every peer knows every other, with its capabilities
                    tables = [await p.ask("peers") for p in peers]
                    if all(t["with_caps"] == n - 1 for t in tables):
                        break
                    if int(time.monotonic() - t0) % 10 == 0:
                        print(f"  n={n} t={time.monotonic() - t0:.0f}s known with caps min/median "
                              f"{min(t['with_caps'] for t in tables)}/"
                              f"{statistics.median(t['with_caps'] for t in tables)}, connections "
                              f"min/max {min(t['connected'] for t in tables)}/"
                              f"{max(t['connected'] for t in tables)}", file=sys.stderr, flush=True)
                    await trio.sleep(0.5)
            converge_s = time.monotonic() - t0
            await trio.sleep(3)  # idle
            rss = [(await p.ask("rss"))["rss"] / 2**20 for p in peers]
            conns = [t["connected"] for t in tables]
            recvs.clear()
            sent.clear()
            for i in range(msgs):
                await peers[i % n].send("announce")
                await trio.sleep(1.0 / rate)
            await trio.sleep(10)  # late deliveries (gossip repair) still count
        finally:
            for p in peers:
                try:
                    await p.send("quit")
                except Exception:
                    pass
            with trio.move_on_after(10):
                for p in peers:
                    await p.proc.wait()
            for p in peers:
                if p.proc.returncode is None:
                    p.proc.kill()
            nursery.cancel_scope.cancel()

    by_msg: dict[tuple[str, int], list[float]] = {}
    for receiver, origin, seq, t in recvs:
        by_msg.setdefault((origin, seq), []).append(t)
    lat, delivered = [], 0
    for origin, seq, t in sent:
        times = by_msg.get((origin, seq), [])
        delivered += len(times)
        if len(times) == n - 1:
            lat.append((max(times) - t) * 1000)
    expected = len(sent) * (n - 1)
    return {
        "n": n, "bare": bare, "converge_s": round(converge_s, 2), "msgs": len(sent),
        "delivery": delivered / expected if expected else 0.0,
        "p50_ms": round(statistics.median(lat), 1) if lat else None,
        "p99_ms": round(pct(lat, 0.99), 1) if lat else None,
        "max_ms": round(max(lat), 1) if lat else None,
        "rss_mib_median": round(statistics.median(rss), 1), "rss_mib_max": round(max(rss), 1),
        "connections_per_peer": round(statistics.mean(conns), 1),
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2,10,30")
    ap.add_argument("--msgs", type=int, default=60)
    ap.add_argument("--rate", type=float, default=5.0, help="announcements per second")
    ap.add_argument("--bare-sizes", default="10",
                    help="sizes to repeat with bare py-libp2p hosts, the baseline ('' for none)")
    args = ap.parse_args()
    results = []
    print(f"peer logs in {LOGDIR}", flush=True)
    runs = [(int(x), False) for x in args.sizes.split(",")]
    runs += [(int(x), True) for x in args.bare_sizes.split(",") if x]
    for n, bare in runs:
        r = await run_size(n, args.msgs, args.rate, bare=bare)
        results.append(r)
        print(json.dumps(r), flush=True)
    print("\nwho     N    p50 ms   p99 ms   max ms  delivery  RSS MiB (median/max)  converge s  conns")
    for r in results:
        print(f"{'bare' if r['bare'] else 'synord':<7} {r['n']:<4} {r['p50_ms']!s:>7}  {r['p99_ms']!s:>7}  "
              f"{r['max_ms']!s:>7}  {r['delivery']:>7.1%}   {r['rss_mib_median']:>6}/{r['rss_mib_max']:<6}"
              f"          {r['converge_s']:>6}  {r['connections_per_peer']:>5}")
    print(f"\ntargets (largest N): p50 <= {TARGETS['p50_ms']} ms, p99 <= {TARGETS['p99_ms']} ms, "
          f"delivery 100%, idle RSS <= {TARGETS['rss_mib']} MiB; baselines = N=2 (one hop) and bare "
          "py-libp2p GossipSub at the same N (issue 20: synord p50 <= 2x the baseline's)")
    ours = [r for r in results if not r["bare"]]
    big = ours[-1]
    ok = (big["p50_ms"] is not None and big["p50_ms"] <= TARGETS["p50_ms"]
          and big["p99_ms"] <= TARGETS["p99_ms"] and big["delivery"] >= TARGETS["delivery"]
          and big["rss_mib_max"] <= TARGETS["rss_mib"])
    print("verdict:", "meets targets" if ok else "MISSES targets", f"(N={big['n']})")
    for b in (r for r in results if r["bare"]):
        same = next((r for r in ours if r["n"] == b["n"]), None)
        if same and same["p50_ms"] and b["p50_ms"]:
            ratio = same["p50_ms"] / b["p50_ms"]
            print(f"N={b['n']}: synord p50 / bare py-libp2p p50 = {ratio:.2f}x "
                  f"({'within' if ratio <= 2 else 'over'} 2x)")


if __name__ == "__main__":
    trio.run(main)
