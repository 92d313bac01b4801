"""The DHT on the NAT testbed (tests/netlab.py): real daemons inside network namespaces.
Needs root (CI has it); skips with the reason otherwise."""

from daemons import wait_for
from jobs_helpers import CONSUMER_ONLY, PROBE_WASM, ensure_assets, submit, wait_job

LISTEN = "/ip4/0.0.0.0/tcp/4001"
READY_S = 90  # starting a daemon takes 3 s on an idle 2-core machine, 15+ s on a busy one


def _start(cluster, netlab, host, **kw):
    return cluster.spawn(host, netns=netlab.ns(host), listen=LISTEN, **kw)


def test_a_home_behind_nat_is_a_dht_client_and_still_places_on_public_providers(netlab, cluster):
    """Anchors on the public side serve the DHT; a daemon behind a NAT learns it is private,
    switches to client mode (so nobody puts an unreachable node in a routing table),
    and still finds and uses the providers."""
    ensure_assets()
    anchor1 = _start(cluster, netlab, "anchor1").wait_ready(READY_S)
    boot = [a for a in anchor1.p2p_addrs() if netlab.ip("anchor1") in a]
    anchor2 = _start(cluster, netlab, "anchor2", bootstrap=boot).wait_ready(READY_S)
    home = _start(cluster, netlab, "a1", bootstrap=boot, config=CONSUMER_ONLY).wait_ready(READY_S)
    assert home.status()["dht"]["mode"] == "client"  # a private address only: client from the start
    for anchor in (anchor1, anchor2):
        assert anchor.status()["dht"]["mode"] == "server"
    wait_for(lambda: home.status()["reachability"]["status"] == "private", timeout=90,
             what="the home daemon to learn it is private")
    assert home.status()["dht"]["mode"] == "client"
    wait_for(lambda: home.status()["dht"]["routing_table"] >= 1, timeout=30,
             what="the anchors in the home's routing table")
    # the anchors hold each other, never the home daemon
    for anchor in (anchor1, anchor2):
        assert anchor.status()["dht"]["routing_table"] == 1
    wait_for(lambda: anchor2.status()["dht"]["providing"] == 1, timeout=30, what="anchor2 providing 'cpu'")

    job_id = submit(home, str(PROBE_WASM), "--", "hello")
    assert wait_job(home, job_id)["state"] == "succeeded"
    # nothing was dialled at 0.0.0.0 or at loopback from inside the namespaces
    counters = netlab.counters()
    assert counters["a1"]["loopback_syn"] == 0, counters
    assert home.status()["reachability"]["dials"].get("unspecified", 0) == 0
