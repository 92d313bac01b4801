"""Reachability, addresses and LAN discovery on the NAT testbed (tests/netlab.py): real daemons
inside network namespaces. Needs root (CI has it); skips with the reason otherwise."""

import json
import time

from daemons import wait_for

LISTEN = "/ip4/0.0.0.0/tcp/4001"
READY_S = 90  # starting a daemon takes 3 s on an idle 2-core machine, 15+ s on a busy one


def _start(cluster, netlab, host, **kw):
    return cluster.spawn(host, netns=netlab.ns(host), listen=LISTEN, **kw)


def _peer_ids(d) -> set[str]:
    return {p["peer_id"] for p in d.get("/v1/peers")}


def test_two_daemons_on_one_home_lan_find_each_other_by_mdns(netlab, cluster):
    a1 = _start(cluster, netlab, "a1", mdns=True)
    a2 = _start(cluster, netlab, "a2", mdns=True)
    a1.wait_ready(READY_S); a2.wait_ready(READY_S)
    t0 = time.monotonic()
    id1, id2 = a1.status()["peer_id"], a2.status()["peer_id"]
    wait_for(lambda: id2 in _peer_ids(a1) and id1 in _peer_ids(a2), timeout=30,
             what="a1 and a2 to find each other by mDNS (no bootstrap)")
    print(f"mDNS: found each other {time.monotonic() - t0:.1f} s after both were ready")
    # they met at their LAN addresses, and nobody advertised or dialled 0.0.0.0
    assert all("0.0.0.0" not in a for a in a1.p2p_addrs())
    assert netlab.counters()["a1"]["loopback_syn"] == 0
    assert netlab.counters()["a2"]["loopback_syn"] == 0


def _reach(d) -> dict:
    return d.status()["reachability"]


def test_autonat_public_anchors_and_homes_behind_cone_and_symmetric_nats(netlab, cluster):
    t0 = time.monotonic()
    anchor1, anchor2 = _start(cluster, netlab, "anchor1"), _start(cluster, netlab, "anchor2")
    anchor1.wait_ready(READY_S); anchor2.wait_ready(READY_S)
    # the homes bootstrap from both anchors; each anchor's servers are then the two homes
    boot = [a for d in (anchor1, anchor2) for a in d.p2p_addrs() if netlab.ip(d.name) in a]
    a1 = _start(cluster, netlab, "a1", bootstrap=boot)
    c1 = _start(cluster, netlab, "c1", bootstrap=boot)
    a1.wait_ready(READY_S); c1.wait_ready(READY_S)

    for d in (anchor1, anchor2):
        wait_for(lambda d=d: _reach(d)["status"] == "public", timeout=90,
                 what=f"{d.name} to learn it is public")
    for d in (a1, c1):
        wait_for(lambda d=d: _reach(d)["status"] == "private", timeout=90,
                 what=f"{d.name} to learn it is private")
    print(f"reachability known {time.monotonic() - t0:.1f} s after the first daemon started")
    r1, rc = _reach(a1), _reach(c1)
    # identify's observed addresses: the router's public address, never a private one
    assert r1["observed_addrs"] and all(netlab.public_ip("a1") in a for a in r1["observed_addrs"])
    assert all(netlab.public_ip("c1") in a for a in rc["observed_addrs"])
    assert r1["nat_type"] == "cone" and rc["nat_type"] == "symmetric"
    assert r1["relays"] == []
    # anchors never hear a home's private address: identify and peer exchange filter them
    for anchor in (anchor1, anchor2):
        for peer in anchor.get("/v1/peers"):
            assert not any("192.168." in a for a in peer.get("addrs", [])), peer

    doc = a1.cli("doctor", "--json")
    net = {c["name"]: c for c in json.loads(doc.stdout)["checks"] if c["name"].startswith("network.")}
    assert "forward TCP port 4001" in net["network.reachability"]["reason"]
    assert "cone" in net["network.reachability"]["reason"]
    assert "symmetric" in json.loads(c1.cli("doctor", "--json").stdout)["network"]["nat_type"]
    text = a1.cli("doctor").stdout
    assert "network.reachability: private" in text
    assert "reachable    private (seen at /ip4/198.18.0.1/tcp/" in a1.cli("status").stdout
    pub = json.loads(anchor1.cli("doctor", "--json").stdout)
    assert [c for c in pub["checks"] if c["name"] == "network.reachability"][0]["ok"]

    # nothing was dialled at 0.0.0.0, loopback or another LAN's private address
    counters = netlab.counters()
    assert all(counters[h]["loopback_syn"] == 0 for h in ("a1", "c1")), counters
    assert all(counters[r]["private_out"] == 0 for r in ("natA", "natC")), counters
    for d in (anchor1, anchor2, a1, c1):
        assert _reach(d)["dials"].get("unspecified", 0) == 0
