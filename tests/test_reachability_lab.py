"""Reachability, addresses and LAN discovery on the NAT testbed (tests/netlab.py): real daemons
inside network namespaces. Needs root (CI has it); skips with the reason otherwise."""

import time

from daemons import wait_for

LISTEN = "/ip4/0.0.0.0/tcp/4001"


def _peer_ids(d) -> set[str]:
    return {p["peer_id"] for p in d.get("/v1/peers")}


def test_two_daemons_on_one_home_lan_find_each_other_by_mdns(netlab, cluster):
    a1 = cluster.spawn("a1", netns=netlab.ns("a1"), listen=LISTEN, mdns=True)
    a2 = cluster.spawn("a2", netns=netlab.ns("a2"), listen=LISTEN, mdns=True)
    a1.wait_ready(); a2.wait_ready()
    t0 = time.monotonic()
    id1, id2 = a1.status()["peer_id"], a2.status()["peer_id"]
    wait_for(lambda: id2 in _peer_ids(a1) and id1 in _peer_ids(a2), timeout=30,
             what="a1 and a2 to find each other by mDNS (no bootstrap)")
    print(f"mDNS: found each other {time.monotonic() - t0:.1f} s after both were ready")
    # they met at their LAN addresses, and nobody advertised or dialled 0.0.0.0
    assert all("0.0.0.0" not in a for a in a1.p2p_addrs())
    assert netlab.counters()["a1"]["loopback_syn"] == 0
    assert netlab.counters()["a2"]["loopback_syn"] == 0
