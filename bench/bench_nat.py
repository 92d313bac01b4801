"""NAT traversal on the testbed (tests/netlab.py): hole-punch success, time to a direct
connection, relayed vs direct throughput.

Builds the namespace topology, starts a light peer (tests/natpeer.py: the daemon's
libp2p mesh and relay service, nothing else) on anchor1 (the relay), a1 and b1
(behind the two port-restricted cone NATs) and c1 (behind the symmetric NAT).
Each trial: a1 dials the target through the relay, DCUtR punches, and we time
first contact (relayed connection up) and the direct connection; then a1 drops the
peer.  Throughput: N MiB a1 -> c1 (through the relay: symmetric NAT) and a1 -> b1
(direct after the punch), optionally with every router's uplink capped (--uplink-mbit 20).

    PYTHONPATH=$PWD .venv/bin/python bench/bench_nat.py [--trials 20] [--mib 20] [--uplink-mbit 20]
    ... [--smoke]       a short run (2 trials, 1 MiB) for tests/test_bench_smoke.py
    ... [--dht]         also run bench/bench_dht.py (DHT lookup latency, >= 30 daemons) if present

Needs root (network namespaces); without it the script says so and exits 0 (nothing measured).
Targets (issue 14): >= 90 % punch success between the cone NATs, p50 first contact -> direct <= 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

TARGETS = {"success": 0.90, "p50_direct_s": 2.0}


class Peer:
    def __init__(self, lab, host: str, *args: str):
        self.host = host
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_nat_{lab.prefix}_{host}.log", "w")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])))
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.ns(host), sys.executable, str(ROOT / "tests" / "natpeer.py"),
             "--listen", "/ip4/0.0.0.0/tcp/4001", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        ready = self.wait("ready", 60)
        self.peer_id = ready["peer_id"]

    def wait(self, ev: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.host}: peer exited (see {self.log.name})")
            msg = json.loads(line)
            if msg.get("ev") == ev:
                return msg
        raise TimeoutError(f"{self.host}: no {ev} in {timeout} s")

    def ask(self, line: str, ev: str, timeout: float = 60) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.wait(ev, timeout)

    def stop(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(5)
        except Exception:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


def wait_reserved(peer: Peer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["reserved"] for r in peer.ask("info", "info")["relays"]):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{peer.host}: no relay reservation in {timeout} s")


def trials(dialer: Peer, target: Peer, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        res = dialer.ask(f"dial {target.peer_id}", "dial")
        out.append(res)
        dialer.ask(f"drop {target.peer_id}", "dropped")
        time.sleep(0.3)
    return out


def throughput(dialer: Peer, target: Peer, nbytes: int) -> dict:
    dialer.ask(f"dial {target.peer_id}", "dial")
    res = dialer.ask(f"send {target.peer_id} {nbytes}", "send", timeout=300)
    dialer.ask(f"drop {target.peer_id}", "dropped")
    if "error" in res or res.get("got") != nbytes:
        return {"error": res.get("error", f"received {res.get('got')} of {nbytes} bytes"), "relayed": res["relayed"]}
    return {"mib_s": nbytes / res["s"] / (1 << 20), "relayed": res["relayed"]}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--sym-trials", type=int, default=2, help="punch attempts against the symmetric NAT")
    ap.add_argument("--mib", type=float, default=20)
    ap.add_argument("--uplink-mbit", type=float, default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--dht", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.trials, args.sym_trials, args.mib = 2, 1, 1
    from netlab import NetLab, unavailable_reason
    reason = unavailable_reason()
    if reason:
        print(f"bench_nat: nothing measured: {reason}")
        return 0
    peers: list[Peer] = []
    with NetLab(uplink_mbit=args.uplink_mbit) as lab:
        try:
            relay = Peer(lab, "anchor1", "--hop", "on", "--enabled", "off")
            peers.append(relay)
            boot = f"/ip4/{lab.ip('anchor1')}/tcp/4001/p2p/{relay.peer_id}"
            a1, b1, c1 = (Peer(lab, h, "--bootstrap", boot) for h in ("a1", "b1", "c1"))
            peers += [a1, b1, c1]
            for p in (a1, b1, c1):
                wait_reserved(p)
            cone = trials(a1, b1, args.trials)
            sym = trials(a1, c1, args.sym_trials)
            nbytes = int(args.mib * (1 << 20))
            relayed = throughput(a1, c1, nbytes)
            direct = throughput(a1, b1, nbytes)
            counters = lab.counters()
        finally:
            for p in peers:
                p.stop()
    ok = [t for t in cone if t["ok"] and t["direct_s"] is not None]
    rate = len(ok) / len(cone)
    first = [t["relayed_s"] for t in cone if t["ok"]]
    to_direct = [t["direct_s"] - t["relayed_s"] for t in ok]
    print(f"hole punch a1 (natA, cone) -> b1 (natB, cone): {len(ok)}/{len(cone)} direct = {rate:.0%} "
          f"(target >= {TARGETS['success']:.0%}: {'met' if rate >= TARGETS['success'] else 'NOT met'})")
    if first:
        print(f"  first contact through the relay: p50 {statistics.median(first) * 1000:.0f} ms, "
              f"max {max(first) * 1000:.0f} ms")
    if to_direct:
        p50 = statistics.median(to_direct)
        print(f"  first contact -> direct: p50 {p50:.2f} s, p90 {pct(to_direct, 0.9):.2f} s, "
              f"max {max(to_direct):.2f} s (target p50 <= {TARGETS['p50_direct_s']} s: "
              f"{'met' if p50 <= TARGETS['p50_direct_s'] else 'NOT met'})")
    sym_ok = sum(1 for t in sym if t["ok"])
    sym_direct = sum(1 for t in sym if t["direct_s"] is not None)
    print(f"symmetric NAT (c1): relayed connection {sym_ok}/{len(sym)}, went direct {sym_direct}/{len(sym)} "
          "(expected 0: the relay carries it)")
    for name, res in (("relayed (a1 -> c1)", relayed), ("direct (a1 -> b1)", direct)):
        if "error" in res:
            print(f"throughput {name}: failed: {res['error']}")
        else:
            print(f"throughput {name}, {args.mib:g} MiB: {res['mib_s']:.1f} MiB/s "
                  f"(connection relayed: {res['relayed']})")
    if args.uplink_mbit:
        print(f"  uplinks capped at {args.uplink_mbit:g} Mbit/s = {args.uplink_mbit / 8.388608:.1f} MiB/s")
    leaks = {k: v for k, v in counters.items() if any(v.get(x) for x in ("private_out", "loopback_syn"))}
    print(f"router/host leak counters (private_out, loopback_syn): {leaks or 'all zero'}")
    if args.dht:
        dht = ROOT / "bench" / "bench_dht.py"
        if dht.exists():
            subprocess.run([sys.executable, str(dht), *(["--smoke"] if args.smoke else [])], cwd=ROOT)
        else:
            print("DHT lookup latency: bench/bench_dht.py is not on this branch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
