"""Real synord daemons as separate processes on loopback: discovery, caps, faults."""

import os
import signal
import socket
import time

import pytest

from daemons import DaemonCluster, wait_for

N = 5


@pytest.fixture(scope="module")
def five(tmp_path_factory):
    with DaemonCluster(tmp_path_factory.mktemp("mesh5")) as cluster:
        boot = cluster.start("d0")
        boot_addr = boot.p2p_addrs()[0]
        port = int(boot_addr.split("/tcp/")[1].split("/")[0])
        others = [cluster.spawn(f"d{i}", bootstrap=[boot_addr]) for i in range(1, N)]
        # hostile bytes at the bootstrap's libp2p port while the others join
        garbage = _garbage(port)
        for d in others:
            d.wait_ready(timeout=60)
        yield cluster, boot, others, garbage


def _garbage(port: int) -> list[socket.socket]:
    held = []
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if i == 0:  # a valid multistream header, then junk in place of a Noise handshake
            s.sendall(b"\x13/multistream/1.0.0\n\x07/noise\n" + os.urandom(512))
        else:
            s.sendall(os.urandom(64 * i))
        if i % 5 == 0:
            held.append(s)  # stays open, silent
        else:
            s.close()
    return held


def peer_table(d) -> dict:
    return {p["peer_id"]: p for p in d.get("/v1/peers")}


def ids(daemons) -> dict:
    return {d.name: d.status()["peer_id"] for d in daemons}


def test_five_daemons_see_each_other_and_capabilities(five):
    cluster, boot, others, _ = five
    everyone = [boot, *others]
    pid = ids(everyone)

    def complete():
        for d in everyone:
            table = peer_table(d)
            want = {pid[o.name] for o in everyone if o is not d}
            if set(table) != want or any(not table[w]["capabilities"] for w in want):
                return False
        return True
    wait_for(complete, timeout=45, interval=0.5, what="5 daemons with each other's capabilities")
    # what a peer announced is what the others hold, signed and addressed by it
    mine = others[0].get("/v1/peers")
    seen_by_boot = peer_table(boot)[pid[others[0].name]]
    assert "devices" in seen_by_boot["capabilities"] or "host" in seen_by_boot["capabilities"]
    assert all(a.endswith("/p2p/" + pid[others[0].name]) for a in seen_by_boot["addrs"])
    assert seen_by_boot["last_seen"] > time.time() - 120
    # the garbage connections did not hurt the bootstrap node
    assert boot.proc.poll() is None and mine
    st = boot.cli("status", "--json").stdout
    assert '"peer_id"' in st


def test_killed_daemon_disappears(five):
    cluster, boot, others, _ = five
    victim = others[-1]
    gone = victim.status()["peer_id"]
    survivors = [boot, *others[:-1]]
    assert all(gone in peer_table(d) for d in survivors)
    victim.kill()
    wait_for(lambda: all(gone not in peer_table(d) for d in survivors), timeout=20,
             interval=0.3, what="killed daemon dropped from every peer table")


def test_stopped_daemon_disappears(five):
    cluster, boot, others, _ = five
    victim = others[0]
    frozen = victim.status()["peer_id"]
    survivors = [boot, *others[1:-1]]
    assert all(frozen in peer_table(d) for d in survivors)
    victim.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: all(frozen not in peer_table(d) for d in survivors), timeout=40,
                 interval=0.5, what="SIGSTOPped daemon dropped (health pings)")
    finally:
        victim.signal(signal.SIGCONT)
