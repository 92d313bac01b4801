"""`synord doctor`'s network checks: why (not) reachable, in words a user can act on.

Pure: reads the mesh's ``reachability_json()`` (see synord.protocols.p2p) and returns checks
named ``network.*``. They explain, they do not fail the doctor: a home node behind a router
is a normal, working node (it goes through relays and hole punching).
"""

from __future__ import annotations

from synord.protocols import addrs as addr_policy


def _port(addrs: list[str]) -> str | None:
    for a in addrs:
        parts = a.split("/")
        if "tcp" in parts:
            return parts[parts.index("tcp") + 1]
    return None


def _short(peer: str) -> str:
    return peer[:16]


def network_checks(r: dict) -> list[dict]:
    checks = []
    listen = r.get("listen_addrs", [])
    scopes = {addr_policy.scope(a) for a in listen}
    if not listen:
        checks.append({"name": "network.listen", "ok": False,
                       "reason": "not listening on any address: set node.listen in config.toml"})
    elif scopes <= {addr_policy.LOOPBACK}:
        checks.append({"name": "network.listen", "ok": False,
                       "reason": f"listening on loopback only ({', '.join(listen)}): no other "
                                 "machine can connect; set node.listen to /ip4/0.0.0.0/tcp/4001"})
    else:
        checks.append({"name": "network.listen", "ok": True,
                       "reason": "listening on " + ", ".join(listen)})

    status = r.get("status", "unknown")
    votes = r.get("votes", [])
    observed = r.get("observed_addrs", [])
    relays = r.get("relays", [])
    nat = r.get("nat_type", "unknown")
    port = _port(listen) or "4001"
    lan_ip = next((addr_policy.ip_of(a) for a in listen
                   if addr_policy.scope(a) == addr_policy.PRIVATE), None)
    asked = ", ".join(f"{_short(v['server'])}: {v['result']}" for v in votes) or "nobody yet"
    seen = ", ".join(observed) or "no peer has told us yet"
    if status == "public":
        reason = (f"public: {r.get('votes_ok', 0)} peer(s) outside this network dialled this "
                  f"node back ({asked}); others can connect to it directly")
    elif status == "private":
        reason = (f"private: peers outside this network could not dial this node back "
                  f"({asked}). The internet sees it at {seen}, and the router drops connections "
                  f"it did not ask for. To be reachable directly, forward TCP port {port} on "
                  f"your router to {lan_ip or 'this machine'}")
        if nat == "symmetric":
            reason += ("; the router also changes the port for every destination (symmetric "
                       "NAT): hole punching cannot work, direct connections need that port "
                       "forward")
        elif nat == "cone":
            reason += "; the router keeps ports (cone NAT): hole punching should work"
        reason += ". Until then other nodes reach it " + (
            "through relay(s) " + ", ".join(relays) if relays else
            "only through a relay, and it has no relay reservation yet")
    else:
        reason = (f"unknown: no peer outside this network has answered a dial-back request "
                  f"yet ({asked}). Connect to a public node: add its address to node.bootstrap")
    checks.append({"name": "network.reachability", "ok": status == "public" or bool(relays),
                   "reason": reason})
    checks.append({"name": "network.observed", "ok": bool(observed),
                   "reason": (f"peers see this node at {seen}; NAT type: {nat}") if observed else
                   "no peer outside this network has reported the address it sees this node at"})

    boot = r.get("bootstrap", [])
    if boot:
        down = [b["addr"] for b in boot if not b.get("connected")]
        checks.append({"name": "network.bootstrap", "ok": not down, "reason": (
            f"connected to all {len(boot)} bootstrap peer(s)" if not down else
            "not connected to " + ", ".join(down) + ": check the address and that this "
            "machine can reach it (firewall, typo in the peer id)")})

    mdns = r.get("mdns", {})
    if not mdns.get("enabled", False):
        checks.append({"name": "network.mdns", "ok": True,
                       "reason": "mDNS is off (node.mdns): no discovery on the local network"})
    else:
        adv = mdns.get("advertised", [])
        checks.append({"name": "network.mdns", "ok": bool(adv), "reason": (
            f"advertising {', '.join(adv)} on the local network; {mdns.get('lan_peers', 0)} "
            "peer(s) connected on it" if adv else
            "mDNS is on but this node has no LAN address to advertise (listening on loopback?)")})
    return checks
