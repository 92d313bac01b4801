"""synord.netdoctor: the network part of `synord doctor`, from a reachability report (pure)."""

from synord.netdoctor import network_checks

HOME = {
    "status": "private", "votes_ok": 0, "votes_failed": 2, "nat_type": "cone",
    "votes": [{"server": "12D3KooWanchor1xxxx", "result": "failed"},
              {"server": "12D3KooWanchor2xxxx", "result": "refused"}],
    "observed_addrs": ["/ip4/198.18.0.1/tcp/40123"], "relays": [],
    "listen_addrs": ["/ip4/127.0.0.1/tcp/4001/p2p/X", "/ip4/192.168.1.10/tcp/4001/p2p/X"],
    "mdns": {"enabled": True, "advertised": ["/ip4/192.168.1.10/tcp/4001"], "lan_peers": 1},
    "bootstrap": [{"addr": "/ip4/198.18.0.11/tcp/4001/p2p/A", "connected": True},
                  {"addr": "/ip4/198.18.0.12/tcp/4001/p2p/B", "connected": False}],
}


def _by_name(report):
    return {c["name"]: c for c in network_checks(report)}


def test_a_home_node_is_told_what_to_change_on_its_router():
    c = _by_name(HOME)
    why = c["network.reachability"]["reason"]
    assert not c["network.reachability"]["ok"]
    assert why.startswith("private:")
    assert "forward TCP port 4001 on your router to 192.168.1.10" in why
    assert "198.18.0.1/tcp/40123" in why and "hole punching should work" in why
    assert "no relay reservation yet" in why
    assert "12D3KooWanchor1x: failed" in why  # who answered what
    assert not c["network.bootstrap"]["ok"] and "198.18.0.12" in c["network.bootstrap"]["reason"]
    assert c["network.mdns"]["ok"] and "1 peer(s)" in c["network.mdns"]["reason"]


def test_symmetric_nat_and_relays():
    c = _by_name({**HOME, "nat_type": "symmetric", "relays": ["/ip4/198.18.0.11/tcp/4001/p2p/A/p2p-circuit"]})
    why = c["network.reachability"]["reason"]
    assert "symmetric" in why and "hole punching cannot work" in why
    assert "through relay(s) /ip4/198.18.0.11" in why
    assert c["network.reachability"]["ok"]  # reachable, through a relay


def test_public_unknown_and_loopback_only():
    pub = _by_name({**HOME, "status": "public", "votes_ok": 2})
    assert pub["network.reachability"]["ok"] and pub["network.reachability"]["reason"].startswith("public")
    unk = _by_name({**HOME, "status": "unknown", "votes": [], "observed_addrs": []})
    assert "add its address to node.bootstrap" in unk["network.reachability"]["reason"]
    assert not unk["network.observed"]["ok"]
    lo = _by_name({**HOME, "listen_addrs": ["/ip4/127.0.0.1/tcp/4001"], "mdns": {"enabled": False}})
    assert not lo["network.listen"]["ok"] and "loopback only" in lo["network.listen"]["reason"]
    assert "mDNS is off" in lo["network.mdns"]["reason"]
