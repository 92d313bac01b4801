"""synord.protocols.libp2p_loader: py-libp2p without the features a daemon does not use.

The host it builds must be py-libp2p's ``new_host`` part for part (down to the
swarm's transports, upgrader, resource manager, peerstore and config), the
deferred features must not be loaded, and what was deferred must still work
when used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _shape(mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "libp2p_host_shape.py"), mode],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_the_loader_builds_py_libp2ps_host_without_its_unused_features():
    upstream, ours = _shape("upstream"), _shape("loader")
    assert upstream["active"] is False and ours["active"] is True
    # py-libp2p's own import loads them all; ours none of them
    assert upstream["loaded"] == ["Crypto", "aioquic", "coincurve", "dns", "httpx", "miniupnpc", "requests",
                                  "zeroconf"]
    assert ours["loaded"] == []
    # the same host, part by part; only the DNS resolver waits for its first use
    swarm_up, swarm_ours = upstream["shape"]["_network"], ours["shape"]["_network"]
    assert swarm_up.pop("dns_resolver") == "multiaddr.resolvers.dns.DNSResolver"
    assert swarm_ours.pop("dns_resolver") == "synord.protocols.libp2p_loader._LazyDNSResolver"
    assert ours["shape"] == upstream["shape"]
    # deferred, not gone: each works when used
    for key in ("b36", "resolver", "upstream_new_host", "rsa", "secp256k1"):
        assert ours[key] == upstream[key], key
    assert ours["resolver"] == "dns.asyncresolver" and ours["upstream_new_host"] == "libp2p"
    assert ours["rsa"] == ["RSAPublicKey", True] and ours["secp256k1"] == ["Secp256k1PublicKey", True]
