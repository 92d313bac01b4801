"""Build a host the way synord.protocols.p2p does and print its shape as JSON (a helper of
tests/test_libp2p_loader.py, run as a script so that each mode gets a fresh interpreter).

    python tests/libp2p_host_shape.py upstream|loader

``upstream`` imports libp2p the ordinary way first (the loader then stands aside and
``new_host`` is py-libp2p's); ``loader`` lets synord.protocols.libp2p_loader defer."""

import json
import sys

if sys.argv[1] == "upstream":
    import libp2p  # noqa: F401
from synord.protocols import libp2p_loader  # noqa: E402
from synord.protocols.p2p import (NOISE_ID, YAMUX_ID, LeanNoiseTransport as NoiseTransport,  # noqa: E402
                                  LeanYamux as Yamux, create_x25519_key_pair)

import multiaddr  # noqa: E402
from libp2p.crypto.ed25519 import create_new_key_pair  # noqa: E402
from libp2p.custom_types import TProtocol  # noqa: E402
from libp2p.network.config import ConnectionConfig  # noqa: E402

HEAVY = ("aioquic", "zeroconf", "requests", "httpx", "dns", "miniupnpc", "Crypto", "coincurve")


def _simple(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple, set, frozenset)):
        return [type(v).__name__, sorted(str(_simple(x)) for x in v)]
    if isinstance(v, dict):
        return {str(k): _simple(x) for k, x in v.items()}
    return f"{type(v).__module__}.{type(v).__qualname__}"


def shape(obj, depth: int) -> dict:
    """Type and attributes of ``obj``, down to ``depth`` levels of libp2p objects."""
    out = {"__type__": f"{type(obj).__module__}.{type(obj).__qualname__}"}
    for k, v in sorted(vars(obj).items()):
        nested = depth > 1 and hasattr(v, "__dict__") and not isinstance(v, type)
        out[k] = shape(v, depth - 1) if nested and type(v).__module__.startswith("libp2p") else _simple(v)
    return out


kp = create_new_key_pair(b"\x01" * 32)
host = libp2p_loader.new_host(
    key_pair=kp, sec_opt={TProtocol(NOISE_ID): NoiseTransport(kp, noise_privkey=create_x25519_key_pair().private_key)},
    muxer_opt={TProtocol(YAMUX_ID): Yamux}, listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")],
    connection_config=ConnectionConfig(max_connections_per_peer=1), addrs_factory=None)
report = {"active": libp2p_loader.ACTIVE, "shape": shape(host, 3),
          "loaded": sorted(m for m in HEAVY if m in sys.modules)}
# what was deferred is still there when used: a stand-in (AutoTLS's peer id in base36),
# the DNS resolver (dnspython; made, nothing resolved), a name of libp2p/__init__, a
# peer's RSA or secp256k1 key read the way a handshake reads it
from libp2p.security.tls.autotls.acme import compute_b36_peer_id  # noqa: E402

report["b36"] = compute_b36_peer_id(host.get_id())
report["resolver"] = type(host.get_network().dns_resolver._resolver).__module__
from libp2p import new_host as upstream_new_host  # noqa: E402

report["upstream_new_host"] = upstream_new_host.__module__
from libp2p.crypto.rsa import create_new_key_pair as create_rsa_key_pair  # noqa: E402
from libp2p.crypto.serialization import deserialize_public_key  # noqa: E402

from libp2p.crypto.secp256k1 import create_new_key_pair as create_secp_key_pair  # noqa: E402

for key, public in (("rsa", create_rsa_key_pair(bits=1024).public_key), ("secp256k1", create_secp_key_pair().public_key)):
    read_back = deserialize_public_key(public.serialize())
    report[key] = [type(read_back).__qualname__, read_back.to_bytes() == public.to_bytes()]
print(json.dumps(report, default=str))
