"""The market across real daemons (separate processes, loopback): one book
everywhere, no double booking under a race, clean rejections (capacity gone,
paused, denied peer), and bad order gossip kept out of the book.

Where a test needs to hold a stale candidate or forge gossip, the consumer
or the attacker is an in-process `MarketService` / libp2p host talking to the
real daemons over the real wire.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from daemons import ROOT, SYNORD, wait_for
from jobs_helpers import (COUNTER_WASM, CONSUMER_ONLY, PROBE_WASM, asks_at, ensure_assets, job,
                          providers_in_book, submit, wait_job)

HALF_HOST = "[contributor]\ncpu_share = 0.5\n"
SHORT_PLACEMENT = "[jobs]\nplacement_timeout_s = 8.0\n"  # losers give up sooner
FOREVER = ["-e", "COUNT=1000000", "-e", "WORK=2000000"]  # counter.wasm: runs until cancelled


def peer(d) -> str:
    return d.status()["peer_id"]


def ask_view(d) -> set[tuple]:
    return {(a["peer"], a["id"], a["seq"], a["price"], a["cores"], a["memory"], a["expires"])
            for a in asks_at(d)}


def the_ask(d, provider_id: str) -> dict:
    return next(a for a in asks_at(d) if a["peer"] == provider_id)


def agreements(d) -> int:
    return d.get("/v1/book")["agreements"]


async def in_thread(fn, *args, **kw):
    """A blocking call (HTTP to a daemon, starting one) off the trio thread: libp2p keeps running."""
    return await trio.to_thread.run_sync(lambda: fn(*args, **kw))


# ---- (a) one book everywhere ---------------------------------------------------------------

def test_two_providers_and_a_consumer_converge_on_one_book(cluster):
    consumer = cluster.start("consumer", config=CONSUMER_ONLY)
    boot = consumer.p2p_addrs()
    provs = [cluster.start(f"p{i}", bootstrap=boot, config=HALF_HOST) for i in range(2)]
    ids = {peer(p) for p in provs}
    nodes = [consumer, *provs]

    def converged():
        views = [ask_view(d) for d in nodes]
        return views[0] if {v[0] for v in views[0]} == ids and all(v == views[0] for v in views) else None
    view = wait_for(converged, 40, what="the same asks (ids, seqs, prices) at all three daemons")
    assert len(view) == 2  # one cpu ask per provider, nothing else
    # The CLI says the same as the API (one JSON document on stdout).
    doc = json.loads(consumer.cli("book", "--json").stdout)
    cli_view = {(a["peer"], a["id"], a["seq"], a["price"], a["cores"], a["memory"], a["expires"])
                for a in doc["classes"]["cpu"]["asks"]}
    assert cli_view == view or cli_view == ask_view(consumer)  # a re-announcement may land in between
    assert doc["classes"]["cpu"]["best_ask"] == min(a[3] for a in cli_view)
    assert doc["agreements"] == 0 and doc["asks_published"] == 0  # a consumer publishes no asks
    assert all(p.get("/v1/book")["asks_published"] == 1 for p in provs)


# ---- (b) the race: ten placements, room for one -----------------------------------------------

@pytest.mark.slow  # the losers retry for the placement window
def test_ten_consumers_race_for_one_core_exactly_one_agreement(cluster):
    ensure_assets()
    provider = cluster.start("provider", config=HALF_HOST)
    boot = provider.p2p_addrs()
    consumers = [cluster.start(f"c{i}", bootstrap=boot, config=CONSUMER_ONLY + SHORT_PLACEMENT)
                 for i in range(2)]
    pid = peer(provider)
    for c in consumers:
        wait_for(lambda: pid in providers_in_book(c), 40, what="the provider's ask at each consumer")
    cores = the_ask(consumers[0], pid)["cores"]  # the whole ask: room for exactly one task
    procs = []
    for i in range(10):  # ten concurrent `synord run --detach`, five from each consumer daemon
        c = consumers[i % 2]
        procs.append((c, subprocess.Popen(
            [*SYNORD, "--home", str(c.home), "run", "--detach", "--json", "--cpus", str(cores),
             *FOREVER, str(COUNTER_WASM)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=ROOT)))
    jobs = []
    for c, p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        jobs.append((c, json.loads(out)["id"]))

    def states():
        seen = [job(c, j) for c, j in jobs]
        assert agreements(provider) <= 1, "double booking"
        return seen

    def settled():
        seen = states()
        return seen if sum(j["state"] == "failed" for j in seen) == 9 else None
    # Losers retry (for the placement window) and keep being refused while the winner runs.
    seen = wait_for(settled, 120, interval=0.5, what="nine placements refused")
    running = [j for j in seen if j["state"] == "running"]
    assert len(running) == 1 and running[0]["provider"] == pid
    assert agreements(provider) == 1
    assert len([t for t in provider.get("/v1/jobs") if t.get("role") == "provider"]) == 1
    for j in seen:
        if j["state"] == "failed":
            assert "capacity" in j["error"] and "insufficient cpus" in j["error"], j["error"]
    winner = next((c, j) for c, j in jobs if job(c, j)["state"] == "running")
    winner[0].post(f"/v1/jobs/{winner[1]}/cancel")
    wait_job(winner[0], winner[1], timeout=60)


# ---- (c) capacity gone: clean rejection, the job lands on the next ask -------------------------

def test_busy_provider_refuses_and_the_job_lands_on_the_next(cluster):
    ensure_assets()
    # The dear ask is above the default price limit (market.max_price = 1.0): raise it.
    consumer = cluster.start("consumer", config=CONSUMER_ONLY + "[market]\nmax_price = 10.0\n")
    boot = consumer.p2p_addrs()
    cheap = cluster.start("cheap", bootstrap=boot, config=HALF_HOST)
    dear = cluster.start("dear", bootstrap=boot, config=HALF_HOST + "[pricing]\nmin_price = 5.0\n")
    cheap_id, dear_id = peer(cheap), peer(dear)
    wait_for(lambda: providers_in_book(consumer) >= {cheap_id, dear_id}, 40, what="both asks")
    assert the_ask(consumer, cheap_id)["price"] < the_ask(consumer, dear_id)["price"]
    cores = the_ask(consumer, cheap_id)["cores"]
    # The cheap provider's whole ask is taken; its ask stays in the book (still offered).
    busy = submit(consumer, "--cpus", str(cores), *FOREVER, str(COUNTER_WASM))
    assert wait_job(consumer, busy, states=("running",), timeout=60)["provider"] == cheap_id
    assert cheap_id in providers_in_book(consumer)
    res = consumer.cli("run", "--cpus", str(cores), str(PROBE_WASM), "--", "hello", timeout=120)
    assert res.stdout == "hello, wasm\n"
    placed = next(j for j in consumer.get("/v1/jobs") if j.get("artifact") == str(PROBE_WASM))
    assert placed["provider"] == dear_id and placed["state"] == "succeeded"
    assert agreements(cheap) == 1  # the refused proposal reserved nothing
    log = consumer.log()
    assert any("candidate rejected us" in line and cheap_id[:16] in line and "capacity" in line
               for line in log.splitlines()), log[-3000:]
    consumer.post(f"/v1/jobs/{busy}/cancel")
    wait_job(consumer, busy, timeout=60)


@asynccontextmanager
async def market_peer(bootstrap: str):
    """An in-process consumer `MarketService` on its own libp2p host, dialled into the mesh."""
    from synord.protocols.identity import Identity
    from synord.protocols.mesh import MeshConfig
    from synord.protocols.p2p import create_mesh
    from synord.market.pricing import PricingPolicy
    from synord.market.service import MarketService
    from synord.store import Store
    with tempfile.TemporaryDirectory() as tmp:
        mesh = create_mesh(Identity.generate(), MeshConfig(listen=["/ip4/127.0.0.1/tcp/0"], mdns=False,
                                                           bootstrap=[bootstrap]))
        svc = MarketService(mesh.identity, Store(Path(tmp) / "state.db"), mesh, offer=dict,
                            contributing=lambda: False, policy=PricingPolicy(), classes=lambda: ["cpu"])
        async with trio.open_nursery() as nursery:
            await nursery.start(mesh.run)
            await nursery.start(svc.run)
            yield svc
            nursery.cancel_scope.cancel()


async def test_paused_provider_rejects_a_stale_candidate_and_the_next_agrees(cluster):
    from synord.market.port import Needs, PlacementRejected
    first = await in_thread(cluster.start, "first", config=HALF_HOST)
    boot = (await in_thread(first.p2p_addrs))[0]
    second = await in_thread(cluster.start, "second", bootstrap=[boot], config=HALF_HOST)
    first_id, second_id = await in_thread(peer, first), await in_thread(peer, second)
    ids = {first_id, second_id}
    needs = Needs(runtime="wasm", cores=0.5, memory=64 << 20, max_price=None, duration_s=600)
    async with market_peer(boot) as svc:
        with trio.fail_after(40):
            while {c.ask.peer for c in svc.candidates(needs)} != ids:
                await trio.sleep(0.1)
        stale = next(c for c in svc.candidates(needs) if c.ask.peer == first_id)
        # The owner pauses: the ask is withdrawn, but we still hold it (a proposal in flight).
        answer = await in_thread(first.post, "/v1/pause")
        assert answer["paused"] is True
        with pytest.raises(PlacementRejected) as refused:
            await svc.negotiate(stale, needs)
        assert "withdrawn" in str(refused.value) or "paused" in str(refused.value), refused.value
        assert await in_thread(agreements, first) == 0
        # The cancel reached our book too; the next candidate agrees (both signatures).
        with trio.fail_after(20):
            while first_id in {c.ask.peer for c in svc.candidates(needs)}:
                await trio.sleep(0.1)
        nxt = svc.candidates(needs)[0]
        terms = await svc.negotiate(nxt, needs)
        assert terms.provider == second_id and terms.consumer == svc.peer_id
        # negotiate returns once we hold both signatures; our countersign is then on its way.
        await in_thread(wait_for, lambda: agreements(second) == 1, 10, what="the provider's commit")
        await svc.abandon(terms, "test over")


# ---- (d) deny_peers --------------------------------------------------------------------------

def test_denied_consumer_gets_a_clear_reason(cluster):
    ensure_assets()
    consumer = cluster.start("consumer", config=CONSUMER_ONLY + SHORT_PLACEMENT)
    cid = peer(consumer)
    provider = cluster.start("provider", bootstrap=consumer.p2p_addrs(),
                             config=f'[market]\ndeny_peers = ["{cid}"]\n')
    pid = peer(provider)
    wait_for(lambda: pid in providers_in_book(consumer), 40, what="the provider's ask")
    job_id = submit(consumer, str(PROBE_WASM), "--", "hello")
    j = wait_job(consumer, job_id, timeout=120)
    assert j["state"] == "failed", j
    assert "admission" in j["error"] and "does not serve that peer" in j["error"], j["error"]
    assert agreements(provider) == 0


# ---- (e) bad order gossip never enters the book ------------------------------------------------

async def test_bad_order_gossip_never_enters_the_book(cluster):
    from synord.protocols.envelope import now_ms, seal
    from synord.protocols.identity import Identity
    from synord.protocols.mesh import MeshConfig
    from synord.protocols.p2p import create_mesh
    from synord.protocols.orders import Ask, Cancel
    from synord.protocols.topics import orders as orders_topic

    d = await in_thread(cluster.start, "d", config=CONSUMER_ONLY + "[log]\nlevel = \"debug\"\n")
    boot = (await in_thread(d.p2p_addrs))[0]
    topic = orders_topic("cpu")
    mesh = create_mesh(Identity.generate(), MeshConfig(listen=["/ip4/127.0.0.1/tcp/0"], mdns=False,
                                                       peer_exchange=False))
    me = mesh.identity

    def ask(id_: str, seq: int, price: float = 1.0, expires: int | None = None) -> Ask:
        return Ask(id=id_, seq=seq, resource_class="cpu", cores=1.0, memory=1 << 30, price=price,
                   expires=expires or now_ms() + 600_000, runtimes=("wasm",))

    def env(a: Ask, **kw) -> bytes:
        return seal(me, "ask", a.to_body(), **kw).encode()

    async def book() -> dict[str, dict]:
        return {a["id"]: a for a in await in_thread(asks_at, d) if a["peer"] == me.peer_id}

    async def publish_until(data_for, pred, what: str) -> None:
        with trio.fail_after(30):
            while True:
                await mesh.publish(topic, data_for())
                await trio.sleep(0.3)
                if pred(await book()):
                    return

    async with trio.open_nursery() as nursery:
        await nursery.start(mesh.run)
        await mesh.subscribe(topic)
        await mesh.dial(boot)
        now = now_ms()
        replayed = env(ask("replay", 1))
        await publish_until(lambda: replayed, lambda b: "replay" in b, "the replayed ask, first time")
        newer = ask("seq", 5, price=2.0)
        await publish_until(lambda: env(newer), lambda b: "seq" in b, "seq 5")
        cancel = seal(me, "cancel", Cancel("replay", "cpu", "ask", 1).to_body()).encode()
        await publish_until(lambda: cancel, lambda b: "replay" not in b, "the cancel")

        bad = [
            replayed,                                                   # replay after its cancel
            env(ask("seq", 4, price=0.5)),                              # an older seq of a live ask
            seal(me, "ask", {"id": "nonsense", "cores": "lots", "price": -1}).encode(),  # bad body
            seal(me, "ask", {"hello": "world"}).encode(),
            env(ask("stale-body", 1, expires=now - 60_000)),           # valid envelope, ask expired
            env(ask("stale-env", 1), ttl_ms=1_000, now=now - 60_000),  # envelope itself expired
            env(ask("future", 1), now=now + 3_600_000),                # from the future
            seal(Identity.generate(), "ask", ask("forged", 1).to_body()).encode(),  # not the origin
            b"\x93garbage",
        ]
        for data in bad:
            await mesh.publish(topic, data)
        # A good ask published after the bad ones: once it is in, the bad ones were processed.
        barrier = ask("barrier", 1)
        await publish_until(lambda: env(barrier), lambda b: "barrier" in b, "the barrier ask")
        await trio.sleep(1.0)
        seen = await book()
        assert set(seen) == {"seq", "barrier"}, seen
        assert seen["seq"]["seq"] == 5 and seen["seq"]["price"] == 2.0
        assert all(a["peer"] == me.peer_id for a in await in_thread(asks_at, d))  # nothing forged
        nursery.cancel_scope.cancel()
    log = await in_thread(d.log)
    for reason in ("reason=replay", "reason=bad_body", "reason=expired", "reason=future_timestamp",
                   "reason=malformed", "result=expired", "result=stale_seq"):
        assert reason in log, f"{reason} not logged"
    status = await in_thread(d.status)
    assert status["peers"] >= 0  # the daemon is alive and answering after all of it
    # ...and counted every refusal by reason (Prometheus, same token as the API).
    metrics = await in_thread(_metrics, d)
    for reason in ("replay", "bad_body", "expired", "future_timestamp", "malformed", "sender_mismatch"):
        assert f'synord_envelopes_rejected_total{{reason="{reason}",where="market"}}' in metrics, reason


def _metrics(d) -> str:
    import http.client
    host, port = d.client.url.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {d.client.token}"})
    return conn.getresponse().read().decode()


# ---- (f) a soak spreads over equal providers ------------------------------------------------------

def test_sequential_jobs_spread_over_five_equal_providers(cluster):
    """Each job completes before the next: announced load stays 0 everywhere and the
    first provider's reputation rises, so without our own recent placements in the
    router's load every job lands on the same provider."""
    from jobs_helpers import start_mesh
    ensure_assets()
    consumer, provs = start_mesh(cluster, 5)
    for _ in range(10):
        res = consumer.cli("run", str(PROBE_WASM), "--", "hello", timeout=120)
        assert res.stdout == "hello, wasm\n"
    placed = [j["provider"] for j in consumer.get("/v1/jobs")]
    counts = {peer(p): placed.count(peer(p)) for p in provs}
    assert sum(counts.values()) == 10
    asks = [(a["peer"][:16], a["price"], a.get("perf"), a.get("load")) for a in asks_at(consumer)]
    assert sum(1 for n in counts.values() if n) >= 3 and max(counts.values()) <= 5, (counts, asks)
