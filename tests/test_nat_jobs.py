"""Every job path across NATs, on the testbed (tests/netlab.py): real daemons inside network
namespaces.  One topology for the module:

    anchor1, anchor2     public; circuit relays (hop forced on: AutoNAT takes a while to say
                         public); they sell nothing
    a1  behind natA      the consumer (contributes nothing)
    a2  behind natA      provider
    b1  behind natB      provider
    c1  behind natC      provider, symmetric NAT: hole punching cannot work, the relay carries it

Placement is steered by pausing the providers a test does not want.  Needs root (CI has it);
skips with the reason otherwise.
"""

from __future__ import annotations

import sys

import pytest

from daemons import ROOT, DaemonCluster, wait_for
from jobs_helpers import (CONSUMER_ONLY, COUNTER_WASM, PROBE_WASM, ensure_assets, output,
                          providers_in_book, reference_run, refused, submit, wait_job)

LISTEN = "/ip4/0.0.0.0/tcp/4001"
LISTEN_A2 = "/ip4/0.0.0.0/tcp/4002"
ANCHOR = '[relay]\nhop = "on"\n' + CONSUMER_ONLY  # relays; they sell nothing
JOBS = "[jobs]\ncheckpoint_interval_s = 0.5\nlease_timeout_s = 5.0\n"
ENV = ["-e", "COUNT=60", "-e", "WORK=20000000"]


def peer(d) -> str:
    return d.status()["peer_id"]


def relay_status(d) -> dict:
    return d.status()["relay"]


class Lab:
    def __init__(self, netlab, cluster):
        self.net, self.cluster = netlab, cluster
        self.anchor1 = cluster.start("anchor1", netns=netlab.ns("anchor1"), listen=LISTEN, config=ANCHOR)
        boot = [a for a in self.anchor1.p2p_addrs() if netlab.ip("anchor1") in a]
        self.anchor2 = cluster.start("anchor2", netns=netlab.ns("anchor2"), listen=LISTEN, config=ANCHOR,
                                     bootstrap=boot)
        self.boot = boot + [a for a in self.anchor2.p2p_addrs() if netlab.ip("anchor2") in a]
        self.consumer = self.start_consumer()
        # a2 shares natA with a1: on the same port, the NAT could keep 4001 for only one of
        # them towards a given peer and would map the other's punch to a random port (which
        # the peer cannot guess); a home with two daemons gives each its own port
        self.provs = {h: cluster.spawn(h, netns=netlab.ns(h), listen=LISTEN_A2 if h == "a2" else LISTEN,
                                       bootstrap=self.boot, config=JOBS)
                      for h in ("a2", "b1", "c1")}
        for p in self.provs.values():
            p.wait_ready()
        self.ids = {h: peer(p) for h, p in self.provs.items()}

    def start_consumer(self):
        return self.cluster.start("a1", netns=self.net.ns("a1"), listen=LISTEN, bootstrap=self.boot,
                                  config=CONSUMER_ONLY + JOBS + "[relay]\ndirect_wait_s = 3.0\n")

    def only(self, *hosts: str) -> None:
        """Leave only ``hosts``' asks in the consumer's book."""
        for h, p in self.provs.items():
            p.post("/v1/resume" if h in hosts else "/v1/pause")
        want = {self.ids[h] for h in hosts}
        wait_for(lambda: providers_in_book(self.consumer) == want, 90, what=f"only {hosts} in the book")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from netlab import NetLab, unavailable_reason
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    ensure_assets()
    with NetLab() as net, DaemonCluster(tmp_path_factory.mktemp("nat")) as cluster:
        lab = Lab(net, cluster)
        # every home keeps reservations on both relays
        for d in (lab.consumer, *lab.provs.values()):
            wait_for(lambda d=d: sum(r["reserved"] for r in relay_status(d)["relays"]) >= 2, 60,
                     what=f"{d.name}: reservations on both relays")
        wait_for(lambda: providers_in_book(lab.consumer) == set(lab.ids.values()), 90,
                 what="every provider's ask in the consumer's book (gossip through the anchors)")
        yield lab
        # nothing was ever dialled at 0.0.0.0, loopback or another LAN's private address
        counters = net.counters()
        assert all(counters[h]["loopback_syn"] == 0 for h in ("a1", "a2", "b1", "c1")), counters
        assert all(counters[r]["private_out"] == 0 for r in ("natA", "natB", "natC")), counters


def directly_connected(d, peer_id: str) -> bool:
    connected = any(p["peer_id"] == peer_id and p["connected"] for p in d.get("/v1/peers"))
    return connected and peer_id not in relay_status(d)["relayed_peers"]


def receipt(d, aid: str):
    return next((r for r in d.get("/v1/ledger")["receipts"] if r["agreement_id"] == aid), None)


def test_homes_behind_two_cone_nats_trade_a_job_and_end_directly_connected(lab):
    lab.only("b1")
    c = lab.consumer
    res = c.cli("run", str(PROBE_WASM), "--", "hello")
    assert res.stdout == "hello, wasm\n"
    j = next(j for j in c.get("/v1/jobs") if j.get("artifact") == str(PROBE_WASM))
    assert j["state"] == "succeeded" and j["provider"] == lab.ids["b1"]
    aid = j["history"][0]["agreement"]
    wait_for(lambda: receipt(c, aid) and receipt(lab.provs["b1"], aid), 30, what="the receipt in both ledgers")
    # the hole punch replaced the relayed connection (how fast: bench/bench_nat.py)
    wait_for(lambda: directly_connected(c, lab.ids["b1"]), 30, what="a direct connection a1 <-> b1")
    assert relay_status(c)["hole_punches"]["started"] + relay_status(lab.provs["b1"])["hole_punches"]["started"] >= 1


def test_a_provider_behind_a_symmetric_nat_serves_through_the_relay(lab):
    lab.only("c1")
    c = lab.consumer
    res = c.cli("run", str(PROBE_WASM), "--", "hello")
    assert res.stdout == "hello, wasm\n"
    j = next(j for j in c.get("/v1/jobs") if j.get("provider") == lab.ids["c1"])
    assert j["state"] == "succeeded"
    aid = j["history"][0]["agreement"]
    wait_for(lambda: receipt(c, aid) and receipt(lab.provs["c1"], aid), 30, what="the receipt in both ledgers")
    assert not directly_connected(c, lab.ids["c1"])  # no punch through a symmetric NAT


def test_a_large_artefact_is_never_pushed_through_a_relay(lab, tmp_path):
    """c1 (symmetric NAT) is reachable through the relay only: a 2 MiB artefact waits for a
    direct connection that never comes, then the job says why."""
    lab.only("c1")
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_jobs import hello_module  # a WASM module padded with a custom section
    big = hello_module(tmp_path / "big.wasm", pad_bytes=2 << 20)
    job_id = submit(lab.consumer, str(big))
    j = wait_job(lab.consumer, job_id, timeout=120)
    assert j["state"] == "failed", j
    assert "only reachable through a limited relay; transfer of 2.0 MiB refused" in j["error"], j["error"]
    assert refused(lab.consumer, "transfer", "relay-limited") >= 1


def test_a_paused_provider_hands_its_task_to_one_behind_another_nat(lab):
    ref = reference_run(*ENV, str(COUNTER_WASM))
    lab.only("a2")
    c = lab.consumer
    job_id = submit(c, *ENV, str(COUNTER_WASM))
    assert wait_job(c, job_id, states=("running",), timeout=60)["provider"] == lab.ids["a2"]
    lab.provs["b1"].post("/v1/resume")
    wait_for(lambda: lab.ids["b1"] in providers_in_book(c), 60, what="b1 back in the book")
    wait_for(lambda: "step 5 " in output(c, job_id), 60, what="some progress on a2")
    assert lab.provs["a2"].post("/v1/pause")["tasks_handed_back"] == 1
    j = wait_job(c, job_id, timeout=180)
    assert output(c, job_id) == ref.stdout  # continued from the checkpoint: no line lost or twice
    first, second = j["history"]
    assert first["provider"] == lab.ids["a2"] and second["provider"] == lab.ids["b1"]
    assert second["checkpoint_bytes"] > 0
    # a2 punched through to b1 and pushed the checkpoint itself (not through the consumer)
    assert second["checkpoint_route"] == "direct", j


def test_the_consumer_restarts_mid_job_behind_its_nat(lab):
    ref = reference_run(*ENV, str(COUNTER_WASM))
    lab.only("b1")
    job_id = submit(lab.consumer, *ENV, str(COUNTER_WASM))
    wait_for(lambda: "step 5 " in output(lab.consumer, job_id), 90, what="some output")
    lab.consumer.kill()
    lab.consumer = c = lab.start_consumer()
    j = wait_job(c, job_id, timeout=180)
    assert j["exit_code"] == ref.returncode
    assert output(c, job_id) == ref.stdout  # every line exactly once
    assert len(j["history"]) == 1  # re-attached, not re-placed
    aid = j["history"][0]["agreement"]
    wait_for(lambda: receipt(c, aid) and receipt(lab.provs["b1"], aid), 90, what="the receipt in both ledgers")
