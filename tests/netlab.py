"""A NAT testbed of Linux network namespaces: two homes behind cone NATs, one behind a symmetric NAT.

    with NetLab() as lab:                     # or the ``netlab`` pytest fixture
        lab.exec("a1", ["ping", "-c1", lab.ip("anchor1")])
        d = cluster.spawn("a1", netns=lab.ns("a1"), listen="/ip4/0.0.0.0/tcp/4001")

As a script (bench/bench_nat.py uses the module the same way):

    python tests/netlab.py up [--uplink-mbit 20]   # prints the prefix
    python tests/netlab.py status [--prefix P]
    python tests/netlab.py down --prefix P | --all

Topology (``P`` = a per-run prefix ``sn<pid % 10000>``; every namespace is ``P-<name>``):

    P-inet: bridge "inet" = the public internet, 198.18.0.0/24 (RFC 2544 benchmarking range)
      anchor1 198.18.0.11, anchor2 198.18.0.12        public hosts (own namespaces)
      natA 198.18.0.1 --- LAN 192.168.1.0/24: a1 .10, a2 .11   port-restricted cone
      natB 198.18.0.2 --- LAN 192.168.1.0/24: b1 .10           port-restricted cone
      natC 198.18.0.3 --- LAN 192.168.1.0/24: c1 .10           symmetric (--random-fully)

Every LAN uses the SAME private range on purpose: a private address leaked from one LAN to
another points at the wrong host, and the routers count it (``counters()``).

Isolation: no link ever touches the root namespace (veth pairs are created directly inside
the namespaces, so their short names — wan, lan, eth0 — cannot collide with anybody's), no
namespace has a route to the host's interfaces, and ip_forward is on only in the routers.
``down()`` deletes every namespace with the prefix; ``down_all()`` removes labs whose owner
process is gone (state files in /run/synord-netlab/).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

STATE_DIR = Path("/run/synord-netlab")
INET = "198.18.0.0/24"
PRIVATE_DSTS = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "0.0.0.0/8", "100.64.0.0/10"]

# name -> (WAN address, NAT kind)
ROUTERS = {"natA": ("198.18.0.1", "cone"), "natB": ("198.18.0.2", "cone"),
           "natC": ("198.18.0.3", "symmetric")}
ANCHORS = {"anchor1": "198.18.0.11", "anchor2": "198.18.0.12"}
# name -> (router, LAN address)
LAN_HOSTS = {"a1": ("natA", "192.168.1.10"), "a2": ("natA", "192.168.1.11"),
             "b1": ("natB", "192.168.1.10"), "c1": ("natC", "192.168.1.10")}
LAN_GW = "192.168.1.1"
LAN_PREFIX = 24


class NetLabError(RuntimeError):
    pass


def unavailable_reason() -> str | None:
    """Why this machine cannot build the lab (None when it can)."""
    if os.geteuid() != 0:
        return "the NAT testbed needs root (network namespaces)"
    for tool in ("ip", "iptables", "tc"):
        if shutil.which(tool) is None:
            return f"the NAT testbed needs `{tool}` (iproute2 / iptables)"
    probe = f"sn-probe{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"cannot create a network namespace: {res.stderr.strip()}"
    try:
        res = subprocess.run(["ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L", "-n"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            return f"iptables NAT does not work in a namespace: {res.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(cmd: list[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise NetLabError(f"{' '.join(cmd)}: {res.stderr.strip() or res.returncode}")
    return res


def _namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NetLab:
    """One testbed. ``up()`` builds it, ``down()`` removes it; also a context manager."""

    def __init__(self, prefix: str | None = None, uplink_mbit: float | None = None,
                 owner_pid: int | None = None):
        self.prefix = prefix or f"sn{os.getpid() % 10000}"
        if not re.fullmatch(r"sn[0-9a-z]{1,8}", self.prefix):
            raise NetLabError(f"prefix {self.prefix!r}: want 'sn' + up to 8 lowercase letters/digits")
        self.uplink_mbit = uplink_mbit
        self.owner_pid = owner_pid or os.getpid()

    # ---- names and addresses
    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    @property
    def hosts(self) -> list[str]:
        return [*ANCHORS, *LAN_HOSTS]

    @property
    def routers(self) -> list[str]:
        return list(ROUTERS)

    def ip(self, host: str) -> str:
        """The address a host has on its own network (public for anchors/routers, private on a LAN)."""
        if host in ANCHORS:
            return ANCHORS[host]
        if host in ROUTERS:
            return ROUTERS[host][0]
        if host in LAN_HOSTS:
            return LAN_HOSTS[host][1]
        raise KeyError(host)

    def public_ip(self, host: str) -> str:
        """The address the internet sees a host at (its router's WAN address behind a NAT)."""
        if host in LAN_HOSTS:
            return ROUTERS[LAN_HOSTS[host][0]][0]
        return self.ip(host)

    def router_of(self, host: str) -> str | None:
        return LAN_HOSTS[host][0] if host in LAN_HOSTS else None

    @property
    def state_file(self) -> Path:
        return STATE_DIR / f"{self.prefix}.json"

    # ---- commands inside the lab
    def exec(self, host: str, cmd: list[str], check: bool = True, timeout: float = 30.0,
             **kw) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside ``host``'s namespace (capture output, text)."""
        res = subprocess.run(["ip", "netns", "exec", self.ns(host), *cmd], capture_output=True,
                             text=True, timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise NetLabError(f"[{host}] {' '.join(cmd)} failed ({res.returncode}): "
                              f"{res.stderr.strip()}")
        return res

    def popen(self, host: str, cmd: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns(host), *cmd], **kw)

    def _ip(self, host: str, *args: str) -> None:
        _run(["ip", "-n", self.ns(host), *args])

    def _ipt(self, host: str, *args: str) -> None:
        self.exec(host, ["iptables", "-w", *args])

    def _sysctl(self, host: str, key: str, value: str) -> None:
        self.exec(host, ["sysctl", "-q", "-w", f"{key}={value}"])

    def _veth(self, host_a: str, name_a: str, host_b: str, name_b: str) -> None:
        # created inside host_a's namespace, peer moved straight into host_b's: never in the root ns
        self._ip(host_a, "link", "add", name_a, "type", "veth", "peer", "name", name_b,
                 "netns", self.ns(host_b))

    def _bridge(self, host: str, name: str) -> None:
        self._ip(host, "link", "add", name, "type", "bridge")
        # multicast snooping off: mDNS must flood the LAN like a dumb home switch
        _run(["ip", "-n", self.ns(host), "link", "set", name, "type", "bridge",
              "mcast_snooping", "0"])
        self._ip(host, "link", "set", name, "up")

    # ---- building
    def up(self) -> "NetLab":
        stale = [n for n in _namespaces() if n.startswith(self.prefix + "-")]
        if stale:
            raise NetLabError(f"namespaces with prefix {self.prefix} exist already: {stale} "
                              f"(python tests/netlab.py down --prefix {self.prefix})")
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps({"prefix": self.prefix, "owner_pid": self.owner_pid}))
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        for name in ["inet", *ROUTERS, *ANCHORS, *LAN_HOSTS]:
            _run(["ip", "netns", "add", self.ns(name)])
            self._ip(name, "link", "set", "lo", "up")
            self._sysctl(name, "net.ipv4.ip_forward", "0")
            self._sysctl(name, "net.ipv6.conf.all.disable_ipv6", "1")
        self._bridge("inet", "inet")
        for i, (anchor, addr) in enumerate(ANCHORS.items()):
            self._veth(anchor, "eth0", "inet", f"p{anchor[-1]}")
            self._attach("inet", f"p{anchor[-1]}", "inet")
            self._addr(anchor, "eth0", f"{addr}/24")
        for router, (wan, kind) in ROUTERS.items():
            port = f"r{router[-1]}"
            self._veth(router, "wan", "inet", port)
            self._attach("inet", port, "inet")
            self._addr(router, "wan", f"{wan}/24")
            self._bridge(router, "lan")
            self._addr(router, "lan", f"{LAN_GW}/{LAN_PREFIX}")
            self._sysctl(router, "net.ipv4.ip_forward", "1")
            self._nat(router, kind)
            if self.uplink_mbit:
                self.shape(router, self.uplink_mbit)
        for host, (router, addr) in LAN_HOSTS.items():
            self._veth(host, "eth0", router, host)
            self._attach(router, host, "lan")
            self._addr(host, "eth0", f"{addr}/{LAN_PREFIX}")
            self._ip(host, "route", "add", "default", "via", LAN_GW)
            self._host_counters(host)

    def _attach(self, host: str, port: str, bridge: str) -> None:
        self._ip(host, "link", "set", port, "master", bridge)
        self._ip(host, "link", "set", port, "up")

    def _addr(self, host: str, dev: str, cidr: str) -> None:
        self._ip(host, "addr", "add", cidr, "dev", dev)
        self._ip(host, "link", "set", dev, "up")

    def _nat(self, router: str, kind: str) -> None:
        # Home router: LAN -> WAN masqueraded; WAN -> LAN only for established flows (no
        # unsolicited inbound, no port forwarding). Linux conntrack keeps the source port when it
        # can (endpoint-independent mapping) and filters on the full 5-tuple: port-restricted cone.
        # --random-fully picks a new port per destination: symmetric NAT.
        masq = ["-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"]
        if kind == "symmetric":
            masq += ["--random-fully"]
        self._ipt(router, *masq)
        self._ipt(router, "-P", "FORWARD", "DROP")
        # bridged LAN-internal traffic (a2 -> a1) passes FORWARD too when br_netfilter is loaded
        self._ipt(router, "-A", "FORWARD", "-i", "lan", "-o", "lan", "-j", "ACCEPT")
        # leak counters, before routing (the router has no route to 10/8, it would answer
        # "unreachable" uncounted): anything from the LAN towards a private/zero address other
        # than the LAN itself is counted and dropped (the internet would drop it too)
        self._ipt(router, "-t", "raw", "-A", "PREROUTING", "-i", "lan", "-d",
                  f"{LAN_GW}/{LAN_PREFIX}", "-j", "RETURN")
        for dst in PRIVATE_DSTS:
            self._ipt(router, "-t", "raw", "-A", "PREROUTING", "-i", "lan", "-d", dst, "-j", "DROP")
        self._ipt(router, "-A", "FORWARD", "-i", "lan", "-o", "wan", "-j", "ACCEPT")
        self._ipt(router, "-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
                  "-j", "ACCEPT")
        self._ipt(router, "-A", "FORWARD", "-i", "wan", "-j", "DROP")  # counted: unsolicited inbound
        self._ipt(router, "-A", "INPUT", "-i", "wan", "-m", "conntrack", "--ctstate",
                  "ESTABLISHED,RELATED", "-j", "ACCEPT")
        self._ipt(router, "-A", "INPUT", "-i", "wan", "-p", "icmp", "-j", "ACCEPT")
        self._ipt(router, "-A", "INPUT", "-i", "wan", "-j", "DROP")

    def _host_counters(self, host: str) -> None:
        # Linux turns a connect() to 0.0.0.0 into one to 127.0.0.1, so a dial of 0.0.0.0 shows up
        # as a SYN on lo; so does a dial of the host's own address (e.g. another LAN's private
        # 192.168.1.10 dialled from b1, which IS 192.168.1.10). Daemons in the lab talk to their
        # control API over a unix socket and never dial themselves: every such SYN is a bad dial.
        self._ipt(host, "-A", "OUTPUT", "-o", "lo", "-p", "tcp", "--syn")

    def shape(self, router: str, mbit: float) -> None:
        """Cap a router's uplink (WAN egress) at ``mbit`` Mbit/s (tbf: this kernel has no netem)."""
        _run(["ip", "netns", "exec", self.ns(router), "tc", "qdisc", "replace", "dev", "wan",
              "root", "tbf", "rate", f"{mbit}mbit", "burst", "64kb", "latency", "100ms"])

    # ---- observing
    def counters(self) -> dict:
        """Packet counters: per router ``private_out`` (packets from its LAN towards a private or
        0.0.0.0/8 address: leaks), ``unsolicited_in`` (dropped inbound); per LAN host
        ``loopback_syn`` (TCP connects to 127/8, 0.0.0.0 or the host's own address)."""
        out: dict = {}
        for router in ROUTERS:
            private = sum(p for p, rule in self._rules(router, "PREROUTING", "raw")
                          if rule.startswith("DROP"))
            unsolicited = sum(p for p, rule in
                              self._rules(router, "FORWARD") + self._rules(router, "INPUT")
                              if rule.startswith("DROP") and " wan " in f" {rule} ")
            out[router] = {"private_out": private, "unsolicited_in": unsolicited}
        for host in LAN_HOSTS:
            out[host] = {"loopback_syn": sum(p for p, _ in self._rules(host, "OUTPUT"))}
        return out

    def _rules(self, host: str, chain: str, table: str = "filter") -> list[tuple[int, str]]:
        text = self.exec(host, ["iptables", "-w", "-t", table, "-L", chain, "-n", "-v", "-x"]).stdout
        rows = []
        for line in text.splitlines()[2:]:
            parts = line.split()
            if parts and parts[0].isdigit():
                rows.append((int(parts[0]), " ".join(parts[2:])))
        return rows

    def exists(self) -> list[str]:
        return [n for n in _namespaces() if n.startswith(self.prefix + "-")]

    # ---- teardown
    def down(self) -> None:
        errors = []
        for ns in self.exists():
            # killing what still runs inside first: a namespace with live processes lingers
            pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            res = _run(["ip", "netns", "del", ns], check=False)
            if res.returncode != 0:
                errors.append(f"{ns}: {res.stderr.strip()}")
        self.state_file.unlink(missing_ok=True)
        if errors:
            raise NetLabError("netlab down: " + "; ".join(errors))

    def __enter__(self) -> "NetLab":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()


def down_all(force: bool = False, among: list[str] | None = None) -> list[str]:
    """Remove stale labs: those whose owner process is gone (all of them with ``force``);
    ``among`` limits it to these prefixes."""
    removed = []
    prefixes = {n.split("-", 1)[0] for n in _namespaces() if re.match(r"sn[0-9a-z]{1,8}-", n)}
    for prefix in sorted(prefixes):
        if among is not None and prefix not in among:
            continue
        state = STATE_DIR / f"{prefix}.json"
        owner = None
        try:
            owner = int(json.loads(state.read_text())["owner_pid"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if force or owner is None or not _pid_alive(owner):
            NetLab(prefix).down()
            removed.append(prefix)
    return removed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="netlab", description="NAT testbed of network namespaces")
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up")
    u.add_argument("--prefix")
    u.add_argument("--uplink-mbit", type=float, default=None,
                   help="cap every router's uplink (e.g. 20 for a home line)")
    s = sub.add_parser("status")
    s.add_argument("--prefix")
    d = sub.add_parser("down")
    d.add_argument("--prefix")
    d.add_argument("--all", action="store_true", help="remove labs whose owner process is gone")
    d.add_argument("--force", action="store_true", help="with --all: also labs still owned")
    args = ap.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"netlab: {reason}", file=sys.stderr)
        return 2
    try:
        if args.cmd == "up":
            # owned by the calling shell: `down --all` leaves it alone while that shell lives
            lab = NetLab(args.prefix, uplink_mbit=args.uplink_mbit, owner_pid=os.getppid()).up()
            print(lab.prefix)
            for host in lab.hosts:
                print(f"  {host:8} ns {lab.ns(host):16} {lab.ip(host):14} seen as {lab.public_ip(host)}")
        elif args.cmd == "status":
            labs = sorted({n.split("-", 1)[0] for n in _namespaces() if re.match(r"sn[0-9a-z]{1,8}-", n)})
            for prefix in labs:
                if args.prefix and prefix != args.prefix:
                    continue
                lab = NetLab(prefix)
                print(f"{prefix}: {len(lab.exists())} namespaces")
                print(json.dumps(lab.counters(), indent=1))
            if not labs:
                print("no lab")
        elif args.cmd == "down":
            if args.all:
                print("removed: " + (" ".join(down_all(args.force)) or "nothing"))
            elif args.prefix:
                NetLab(args.prefix).down()
            else:
                ap.error("down needs --prefix P or --all")
    except NetLabError as exc:
        print(f"netlab: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
