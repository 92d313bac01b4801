"""The NAT testbed itself: topology, NAT behaviour (cone vs symmetric, no unsolicited inbound),
leak counters, teardown. Needs root (CI has it); skips with the reason otherwise."""

import subprocess
import sys
import time

import pytest

from netlab import NetLab, down_all, unavailable_reason

PY = sys.executable

_REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

# A TCP server that sends every client the peer address it saw; a UDP one that answers every
# datagram with the address it came from (a STUN server in five lines).
TCP_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(); print("ready", flush=True)
while True:
    c, a = s.accept(); c.sendall(f"{a[0]}:{a[1]}".encode()); c.close()
"""
UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, a = s.recvfrom(100); s.sendto(f"{a[0]}:{a[1]}".encode(), a)
"""
TCP_CLIENT = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print("connected", c.recv(100).decode())
except OSError as e:
    print("failed", type(e).__name__)
"""
# one UDP socket, one datagram to each server given: prints what each server saw
UDP_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
for dst in sys.argv[1:]:
    ip, port = dst.split(":"); s.sendto(b"x", (ip, int(port)))
    try:
        print(s.recvfrom(100)[0].decode())
    except OSError:
        print("timeout")
"""


@pytest.fixture
def lab(netlab):
    return netlab


def _server(lab, host, code, port):
    p = lab.popen(host, [PY, "-c", code, str(port)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def _connect(lab, host, ip, port, timeout=2.0):
    return lab.exec(host, [PY, "-c", TCP_CLIENT, ip, str(port), str(timeout)]).stdout.strip()


def test_lan_host_reaches_anchor_through_its_nat(lab):
    srv = _server(lab, "anchor1", TCP_SERVER, 7001)
    try:
        out = _connect(lab, "a1", lab.ip("anchor1"), 7001)
    finally:
        srv.kill(); srv.wait()
    # anchor1 sees the router's public address, not the private one
    assert out.startswith(f"connected {lab.public_ip('a1')}:"), out


def test_nat_drops_unsolicited_inbound_and_homes_cannot_reach_each_other(lab):
    srv = _server(lab, "a1", TCP_SERVER, 7002)
    try:
        # to natA's public address: no port forwarding, dropped (a timeout, not a refusal)
        assert _connect(lab, "anchor1", lab.public_ip("a1"), 7002) == "failed TimeoutError"
        # to the private address: the internet has no route to it
        assert _connect(lab, "anchor1", lab.ip("a1"), 7002).startswith("failed")
        # b1 (another home) cannot reach a1 either, by any address, before a punch
        assert _connect(lab, "b1", lab.public_ip("a1"), 7002) == "failed TimeoutError"
        # b1's own LAN has the same private range: 192.168.1.10 is b1 itself, never a1
        assert _connect(lab, "b1", lab.ip("a1"), 7002, timeout=1.0).startswith("failed")
        # a2 on the same LAN does reach a1 directly
        assert _connect(lab, "a2", lab.ip("a1"), 7002).startswith(f"connected {lab.ip('a2')}:")
    finally:
        srv.kill(); srv.wait()
    assert lab.counters()["natA"]["unsolicited_in"] >= 2


def test_cone_nats_keep_the_port_and_the_symmetric_one_does_not(lab):
    echos = [_server(lab, a, UDP_ECHO, 3478) for a in ("anchor1", "anchor2")]
    try:
        targets = [f"{lab.ip(a)}:3478" for a in ("anchor1", "anchor2")]
        seen = {h: lab.exec(h, [PY, "-c", UDP_CLIENT, *targets]).stdout.split() for h in ("a1", "c1")}
    finally:
        for e in echos:
            e.kill(); e.wait()
    a1_1, a1_2 = seen["a1"]
    c1_1, c1_2 = seen["c1"]
    assert a1_1.split(":")[0] == lab.public_ip("a1") and a1_1 == a1_2  # one mapping for all
    assert c1_1.split(":")[0] == lab.public_ip("c1")
    assert c1_1 != c1_2  # a new port per destination


def test_leaks_towards_private_addresses_are_counted_and_dropped(lab):
    assert lab.counters()["natB"]["private_out"] == 0
    # b1 dials an address that exists only on some other LAN / network
    assert _connect(lab, "b1", "10.9.9.9", 7003, timeout=1.0).startswith("failed")
    assert _connect(lab, "b1", "0.0.0.0", 7003, timeout=1.0).startswith("failed")
    c = lab.counters()
    assert c["natB"]["private_out"] >= 1 and c["natA"]["private_out"] == 0
    assert c["b1"]["loopback_syn"] == 1  # a dial of 0.0.0.0 is a loopback SYN on the wire
    # a private address from another LAN (a1's) is b1's own address here: counted the same way
    assert _connect(lab, "b1", lab.ip("a1"), 7003, timeout=1.0).startswith("failed")
    assert lab.counters()["b1"]["loopback_syn"] == 2


def test_uplink_cap_is_installed_and_nothing_touches_the_root_namespace():
    with NetLab(uplink_mbit=20) as lab:
        qdisc = lab.exec("natA", ["tc", "qdisc", "show", "dev", "wan"]).stdout
        assert "tbf" in qdisc and "20Mbit" in qdisc
        for host in [*lab.hosts, *lab.routers, "inet"]:
            links = lab.exec(host, ["ip", "-o", "link"]).stdout
            # every link is a veth whose peer lives in another lab namespace, a bridge, or lo
            for line in links.splitlines():
                name = line.split(":")[1].strip().split("@")[0]
                assert name == "lo" or "link-netns" in line or "bridge" in line or \
                    name in ("inet", "lan"), line
                if "link-netns" in line:
                    assert f"link-netns {lab.prefix}-" in line, line
            forward = lab.exec(host, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()
            assert forward == ("1" if host in lab.routers else "0"), host
            routes = lab.exec(host, ["ip", "route"]).stdout
            assert "default" not in routes or host in ("a1", "a2", "b1", "c1"), routes
        prefix = lab.prefix
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix + "-" not in left


def test_down_cleans_up_after_a_failure():
    lab = NetLab()
    with pytest.raises(RuntimeError, match="boom"):
        with lab:
            assert len(lab.exists()) == 10
            raise RuntimeError("boom")
    assert lab.exists() == []
    assert not lab.state_file.exists()


def test_down_all_removes_only_labs_whose_owner_is_gone():
    dead = subprocess.Popen(["true"]); dead.wait()
    stale = NetLab(prefix=f"sn{dead.pid % 10000}x", owner_pid=dead.pid).up()
    live = NetLab(prefix=f"sn{dead.pid % 10000}y").up()  # owned by this test process
    try:
        assert down_all(among=[stale.prefix, live.prefix]) == [stale.prefix]
        assert stale.exists() == [] and len(live.exists()) == 10
    finally:
        stale.down(); live.down()


def test_script_up_status_down():
    script = [PY, str(__import__("netlab").__file__)]
    prefix = f"sn{time.monotonic_ns() % 10000}s"
    up = subprocess.run([*script, "up", "--prefix", prefix], capture_output=True, text=True)
    try:
        assert up.returncode == 0, up.stderr
        assert up.stdout.splitlines()[0] == prefix
        st = subprocess.run([*script, "status", "--prefix", prefix], capture_output=True, text=True)
        assert f"{prefix}: 10 namespaces" in st.stdout
    finally:
        down = subprocess.run([*script, "down", "--prefix", prefix], capture_output=True, text=True)
    assert down.returncode == 0, down.stderr
    assert NetLab(prefix).exists() == []


def test_a_daemon_runs_inside_a_lab_host_and_answers_its_cli(lab, cluster):
    d = cluster.spawn("a1", netns=lab.ns("a1"), listen="/ip4/0.0.0.0/tcp/4001").wait_ready(90)
    assert d.status()["peer_id"]  # control API over the unix socket, from the root namespace
    assert "4001" in " ".join(d.p2p_addrs())
    assert d.cli("status", "--json").returncode == 0
    # it really runs in a1's namespace: a1's port 4001 is taken, the root namespace's is not
    held = lab.exec("a1", ["ss", "-Htln", "sport = :4001"]).stdout
    assert "LISTEN" in held
