"""Gang placement latency: time to hold N providers and commit them together.

One consumer `MarketService` and 8 provider ones, each on its own real
py-libp2p host (Noise, yamux, GossipSub) on loopback, in one process; the
consumer hears every ask over gossip.  For N = 2, 4, 8, each round times
`synord.jobs.gang.reserve` (the gang machine driving N held negotiations: N
proposals at once, N signed agreements, N countersigns) from the call to the
moment every provider has committed its reservation.

Baselines from the same run, on the same connections:
- one negotiation round trip (`MarketService.negotiate`: propose, agreement,
  countersign) to one provider;
- N independent single placements at once (N `negotiate` calls in parallel,
  one per provider): what the gang costs over not being all-or-nothing.

Every agreement is abandoned (untimed) so capacity is free between rounds.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_gang.py [--rounds 20] [--sizes 2,4,8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import trio

from bench_placement import NEEDS, market, row  # the same market services, the same figures
from synord.jobs.gang import reserve
from synord.protocols.identity import Identity
from synord.protocols.mesh import MeshConfig
from synord.protocols.p2p import create_mesh


async def bench(rounds: int, sizes: list[int], providers: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    committed: list[int] = [0]

    def on_agreement(terms) -> None:
        committed[0] += 1

    async def wait_committed(n: int) -> None:
        with trio.fail_after(10):
            while committed[0] < n:
                await trio.sleep(0.001)

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg = MeshConfig(listen=["/ip4/127.0.0.1/tcp/0"], mdns=False, peer_exchange=False)
        cm = create_mesh(Identity.generate(), cfg)
        pms = [create_mesh(Identity.generate(), cfg) for _ in range(providers)]
        cons = market(tmp, "consumer", cm, False)
        provs = [market(tmp, f"p{i}", pm, True, on_agreement) for i, pm in enumerate(pms)]
        async with trio.open_nursery() as nursery:
            for svc in (cm, *pms, cons, *provs):
                await nursery.start(svc.run)
            for pm in pms:
                await cm.dial(pm.listen_addrs()[0])
            with trio.fail_after(60):  # every ask reaches the consumer's book over gossip
                while len(cons.candidates(NEEDS, shortlist=2 * providers)) < providers:
                    await trio.sleep(0.05)
            cands = cons.candidates(NEEDS, shortlist=2 * providers)

            async def settle(all_terms) -> None:  # untimed: free every provider again
                for t in all_terms:
                    await cons.abandon(t, "benchmark round over")
                with trio.fail_after(10):
                    while any(p.pool.used()["cpus"] > 0 for p in provs):
                        await trio.sleep(0.002)
                await trio.sleep(0.05)  # under the providers' per-peer message rate

            for r in range(rounds + 1):  # round 0 warms up every connection
                base = committed[0]
                t0 = time.perf_counter()
                terms = await cons.negotiate(cands[0], NEEDS)
                await wait_committed(base + 1)
                if r:
                    out.setdefault("one", []).append(time.perf_counter() - t0)
                await settle([terms])
                for n in sizes:
                    base = committed[0]
                    got: list = []
                    t0 = time.perf_counter()
                    async with trio.open_nursery() as inner:
                        for c in cands[:n]:
                            inner.start_soon(lambda c=c: _append(got, cons.negotiate(c, NEEDS)))
                    await wait_committed(base + n)
                    if r:
                        out.setdefault(f"independent {n}", []).append(time.perf_counter() - t0)
                    await settle(got)
                    base = committed[0]
                    t0 = time.perf_counter()
                    gang_terms, gang = await reserve(cons, NEEDS, n, within_s=20, seed=r)
                    await wait_committed(base + n)
                    if r:
                        out.setdefault(f"gang {n}", []).append(time.perf_counter() - t0)
                        out.setdefault(f"gang {n} rounds", []).append(gang.rounds)
                    assert len({t.provider for t in gang_terms}) == n
                    await settle(gang_terms)
            nursery.cancel_scope.cancel()
    return out


async def _append(into: list, coro) -> None:
    into.append(await coro)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--sizes", default="2,4,8")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    out = trio.run(bench, args.rounds, sizes, max(sizes))
    print(f"gang placement, {max(sizes)} provider market services + 1 consumer on real libp2p hosts "
          "(loopback, one process)")
    print(row("baseline: one negotiation round trip", out["one"]))
    for n in sizes:
        print(row(f"baseline: {n} independent placements at once", out[f"independent {n}"]))
        print(row(f"gang of {n}: held together, committed", out[f"gang {n}"])
              + f"   rounds max {max(out[f'gang {n} rounds']):g}")


if __name__ == "__main__":
    main()
