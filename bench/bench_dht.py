"""DHT lookup latency: find_peer and find_providers (p50/p99) in a mesh of N nodes.

The nodes are lightweight: N `Libp2pMesh` instances (the daemon's mesh layer: real
py-libp2p hosts, Noise, yamux, GossipSub, the synord DHT in server mode) in ONE
process on loopback, not N full daemons (30 daemons do not fit in 2 cores beside
anything else).  All share one trio loop, so a lookup's latency includes the other
nodes' work.  Peer exchange is off: node i is bootstrapped to two random earlier
nodes, so a lookup has to walk the DHT rather than ask a neighbour.  Health pings
are off (hourly): with 30 nodes on one CPU-starved loop, 5 s ping deadlines were
missed, connections dropped and redialled, and the mesh never settled.

Per sample:
* find_peer: a random node looks up a random node it is not connected to, its
  address book for it emptied first; ok = the target's listen address came back;
* find_providers: ``--providers`` nodes provide one class key each; a random
  other node (its cached records dropped) looks one up; ok = that provider found;
* baseline, same run: a direct dial of a node not connected + one request/response
  round trip on a fresh stream (what a lookup saves you from not knowing).

Also printed: connections per node once settled (with peer exchange off, the
DHT's join lookup is what connects a node beyond its two bootstrap links).

    PYTHONPATH=$PWD .venv/bin/python bench/bench_dht.py [-n 30] [--samples 40] [--json]
    PYTHONPATH=$PWD .venv/bin/python bench/bench_dht.py --smoke
`measure(nodes, samples)` returns the figures as a dict (bench/bench_nat.py uses it).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

ECHO = "/synord/bench-echo/1.0.0"


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _say(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def _summary(ms: list[float], ok: int, n: int) -> dict:
    return {"samples": n, "ok": ok, "p50_ms": _pct(ms, 0.5), "p99_ms": _pct(ms, 0.99),
            "mean_ms": statistics.fmean(ms) if ms else None}


async def _measure(n: int, samples: int, providers: int, settle_s: float, seed: int,
                   px: bool = False, dht: str = "server") -> dict:
    from libp2p.peer.id import ID
    from synord.protocols import kad
    from synord.protocols.identity import Identity
    from synord.protocols.mesh import MeshConfig
    from synord.protocols.p2p import create_mesh

    rng = random.Random(seed)
    meshes = []

    async def echo(peer: str, payload: bytes) -> bytes:
        return payload

    async with trio.open_nursery() as nursery:
        for i in range(n):
            boot = [meshes[j].listen_addrs()[0] for j in rng.sample(range(i), min(2, i))]
            m = create_mesh(Identity.generate(), MeshConfig(
                listen=["/ip4/127.0.0.1/tcp/0"], mdns=False, peer_exchange=px, bootstrap=boot,
                dht=dht, health_interval_s=3600.0))  # see the module doc
            m.set_request_handler(ECHO, echo, max_request=1024)
            await nursery.start(m.run)
            meshes.append(m)
        # bootstrap links, identify, each node's join lookup, and the dials they set off:
        # settled when the number of connections holds still for settle_s (at most 180 s)
        _say(f"{n} nodes started; settling")
        last, still_since, t_start = -1, trio.current_time(), trio.current_time()
        while trio.current_time() - still_since < settle_s and trio.current_time() - t_start < 180:
            total = sum(len(m.connected_peers()) for m in meshes)
            if total != last:
                last, still_since = total, trio.current_time()
            await trio.sleep(0.5)
        settled_s = trio.current_time() - t_start
        conns = [len(m.connected_peers()) for m in meshes]
        table = [m.dht.routing_table.size() if m.dht else 0 for m in meshes]
        if dht == "off":  # only the discovery comparison: no lookups to measure
            nursery.cancel_scope.cancel()
            return {"nodes": n, "px": px, "dht": dht, "settled_s": trio.current_time() - t_start,
                    "connections_per_node": {"min": min(conns), "mean": statistics.fmean(conns),
                                             "max": max(conns)}}

        def unconnected_pair() -> tuple:
            for _ in range(1000):
                a, b = rng.sample(meshes, 2)
                if b.peer_id not in a.connected_peers():
                    return a, b
            a, b = rng.sample(meshes, 2)
            return a, b

        async def forget(a, b) -> None:
            pid = ID.from_base58(b.peer_id)
            if b.peer_id in a.connected_peers():
                with trio.move_on_after(2):
                    await a.host.disconnect(pid)
            a.host.get_peerstore().clear_addrs(pid)

        _say(f"connections per node: mean {statistics.fmean(conns):.1f}; find_peer")
        # -- find_peer ---------------------------------------------------------------
        fp_ms, fp_ok = [], 0
        for _ in range(samples):
            a, b = unconnected_pair()
            await forget(a, b)
            want = b.listen_addrs()[0].split("/p2p/")[0]
            t0 = time.perf_counter()
            found = await a.find_peer(b.peer_id)
            fp_ms.append((time.perf_counter() - t0) * 1000)
            fp_ok += any(x.startswith(want + "/") or x == want for x in found)

        _say("find_providers")
        # -- find_providers ------------------------------------------------------------
        provs = rng.sample(meshes, providers)
        keys = {p.peer_id: kad.class_key(f"bench-{i}") for i, p in enumerate(provs)}
        for p in provs:
            p.provide(keys[p.peer_id])
        with trio.move_on_after(30):
            while not all(p.dht.lookups["provide"] and p.dht._retry.get(keys[p.peer_id]) is None
                          for p in provs):
                await trio.sleep(0.1)
        others = [m for m in meshes if m not in provs]
        pr_ms, pr_ok = [], 0
        for _ in range(samples):
            src, prov = rng.choice(others), rng.choice(provs)
            key = keys[prov.peer_id]
            src.dht.provider_store.providers.pop(key, None)  # no cached answer
            t0 = time.perf_counter()
            found = await src.find_providers(key)
            pr_ms.append((time.perf_counter() - t0) * 1000)
            pr_ok += any(p == prov.peer_id for p, _ in found)

        _say("baseline")
        # -- baseline: dial + one round trip ------------------------------------------------
        bl_ms, bl_ok = [], 0
        for _ in range(samples):
            a, b = unconnected_pair()
            await forget(a, b)
            t0 = time.perf_counter()
            try:
                await a.dial(b.listen_addrs()[0])
                bl_ok += await a.request(b.peer_id, ECHO, b"x", timeout=10) == b"x"
            except Exception:
                pass
            bl_ms.append((time.perf_counter() - t0) * 1000)
        nursery.cancel_scope.cancel()

    return {"nodes": n, "px": px, "dht": dht, "kind": "Libp2pMesh instances in one process (not full daemons)",
            "settled_s": settled_s,
            "connections_per_node": {"min": min(conns), "mean": statistics.fmean(conns), "max": max(conns)},
            "routing_table": {"min": min(table), "mean": statistics.fmean(table)},
            "find_peer": _summary(fp_ms, fp_ok, samples),
            "find_providers": _summary(pr_ms, pr_ok, samples),
            "baseline_dial_rtt": _summary(bl_ms, bl_ok, samples)}


def measure(nodes: int = 30, samples: int = 40, providers: int = 3, settle_s: float = 5.0,
            seed: int = 1, px: bool = False, dht: str = "server") -> dict:
    return trio.run(_measure, nodes, samples, providers, settle_s, seed, px, dht)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--nodes", type=int, default=30)
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--providers", type=int, default=3)
    ap.add_argument("--settle", type=float, default=5.0,
                    help="settled once the connection count holds still this long")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--px", action="store_true", help="peer exchange on too (off by default)")
    ap.add_argument("--no-dht", action="store_true",
                    help="DHT off (with --px: today's discovery; prints connections only)")
    ap.add_argument("--smoke", action="store_true", help="a few nodes and samples (CI)")
    args = ap.parse_args()
    if args.smoke:
        args.nodes, args.samples, args.providers, args.settle = 6, 3, 1, 1.0
    logging.disable(logging.ERROR)  # the library logs every dropped connection at ERROR
    res = measure(args.nodes, args.samples, args.providers, args.settle, args.seed, args.px,
                  "off" if args.no_dht else "server")
    if args.json:
        print(json.dumps(res, indent=2))
        return
    c = res["connections_per_node"]
    if args.no_dht:
        print(f"discovery without DHT ({res['nodes']} nodes, peer exchange {'on' if args.px else 'off'}): "
              f"settled in {res['settled_s']:.0f} s; connections per node {c['min']}/{c['mean']:.1f}/{c['max']}")
        return
    t = res["routing_table"]
    print(f"DHT: {res['nodes']} nodes ({res['kind']}, peer exchange {'on' if args.px else 'off'}), settled in {res['settled_s']:.0f} s; connections per node "
          f"{c['min']}/{c['mean']:.1f}/{c['max']} (min/mean/max), routing table min {t['min']} mean {t['mean']:.1f}")
    print(f"{'operation':<22}{'ok':>8}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name in ("find_peer", "find_providers", "baseline_dial_rtt"):
        r = res[name]
        print(f"{name:<22}{r['ok']:>4}/{r['samples']:<3}{_fmt(r['p50_ms']):>10}{_fmt(r['p99_ms']):>10}"
              f"{_fmt(r['mean_ms']):>10}")


if __name__ == "__main__":
    main()
