"""The synord Kademlia DHT: its wire id and the rules for what peers tell it (no I/O).

Theory of operation.  The DHT itself is py-libp2p's ``libp2p.kad_dht``, driven by
`synord.protocols.dht`; this module holds what that driver decides, so it can be
tested without sockets:

- ``PROTOCOL`` is the only id the synord DHT speaks: never ``/ipfs/kad/1.0.0``,
  so it can neither join IPFS's DHT nor be joined by it;
- every address a peer hands us (closer peers, provider records) is checked by
  `check_addr`: unspecified, multicast and port-0 addresses are never stored or
  returned, only TCP and relay-circuit addresses are kept, a few per peer;
- provider records are bounded: keys held, providers per key, addresses each;
- `class_key` names the providers of one resource class (``cpu``, ``gpu-a100``, ...):
  providers ``provide`` it, consumers ``find_providers`` it and dial the answers;
- `choose_mode` picks server or client mode: server answers DHT queries and is
  put in others' routing tables, so only reachable nodes may run it.
"""

from __future__ import annotations

import hashlib
import ipaddress

from . import addrs as addr_policy

PROTOCOL = "/synord/kad/1.0.0"
IPFS_PROTOCOL = "/ipfs/kad/1.0.0"  # what the library speaks by default; we never do

MODES = ("auto", "server", "client", "off")

MAX_ADDR_LEN = 256        # characters of one multiaddr text
MAX_ADDRS_PER_PEER = 8    # addresses kept per peer / provider record
MAX_PROVIDER_KEYS = 4096  # keys whose provider records we hold for others
MAX_PROVIDERS_PER_KEY = 20  # the library's own cap (k), restated for the unit tests

LOOKUP_S = 15.0           # one find_peer / find_providers, end to end
INBOUND_STREAM_S = 30.0   # an inbound DHT stream (several requests) lives at most this long
REPROVIDE_S = 600.0       # our provider records are sent again this often ...
RECORD_TTL_S = 1800.0     # ... and records others gave us expire after this

CLASS_KEY_PREFIX = b"synord/class/"
_SHA2_256 = b"\x12\x20"  # multihash header: sha2-256, 32 bytes


def class_key(resource_class: str) -> bytes:
    """The DHT key under which providers of ``resource_class`` announce themselves
    (a sha2-256 multihash, as kad keys are)."""
    if not resource_class or len(resource_class) > 64:
        raise ValueError(f"resource class must be 1-64 characters: {resource_class!r}")
    return _SHA2_256 + hashlib.sha256(CLASS_KEY_PREFIX + resource_class.encode()).digest()


def check_addr(text: str) -> str | None:
    """None if ``text`` may be stored and handed out as a peer's address, else the
    refusal reason (a fixed slug, safe as a metrics label)."""
    if not isinstance(text, str) or not text.startswith("/") or len(text) > MAX_ADDR_LEN:
        return "bad-address"
    parts = text.split("/")[1:]
    if "p2p-circuit" in parts:  # a relayed address: the relay's own part is checked below
        parts = parts[:parts.index("p2p-circuit")]
        if not parts:
            return "bad-address"
    if len(parts) < 4 or parts[0] not in ("ip4", "ip6", "dns", "dns4", "dns6") or parts[2] != "tcp":
        return "not-tcp"
    if parts[0] in ("ip4", "ip6"):
        try:
            ip = ipaddress.ip_address(parts[1])
        except ValueError:
            return "bad-address"
        if (ip.version == 4) != (parts[0] == "ip4"):
            return "bad-address"
        if addr_policy.scope_of_ip(parts[1]) == addr_policy.UNSPECIFIED:  # 0.0.0.0/8, ::
            return "unspecified-address"
        if ip.is_multicast or (ip.version == 4 and ip == ipaddress.IPv4Address("255.255.255.255")):
            return "multicast-address"
    elif not parts[1] or len(parts[1]) > 253:
        return "bad-address"
    if not parts[3].isdigit() or not 0 < int(parts[3]) < 65536:
        return "bad-port"
    return None


def sanitize_addrs(addrs) -> tuple[list[str], list[str]]:
    """(addresses kept, refusal reasons of the rest): the first MAX_ADDRS_PER_PEER
    good, distinct addresses; the rest are dropped (reason ``too-many-addresses``)."""
    kept: list[str] = []
    refused: list[str] = []
    for addr in addrs:
        text = str(addr)
        why = check_addr(text)
        if why is not None:
            refused.append(why)
        elif text in kept:
            continue
        elif len(kept) >= MAX_ADDRS_PER_PEER:
            refused.append("too-many-addresses")
        else:
            kept.append(text)
    return kept, refused


def choose_mode(setting: str, reachability: str = "unknown", local_ips: list[str] | None = None) -> str:
    """server / client / off, from ``[dht] mode`` and what we know of our reachability.

    ``auto``: a node known to be publicly reachable serves; one known to be behind
    a NAT is a client.  While reachability is unknown, a node whose only
    non-loopback addresses are private (a home LAN) is a client, any other (a
    public address, or a loopback-only test mesh) serves."""
    if setting not in MODES:
        raise ValueError(f"dht mode must be one of {', '.join(MODES)}: {setting!r}")
    if setting != "auto":
        return setting
    if reachability == "public":
        return "server"
    if reachability == "private":
        return "client"
    scopes = {addr_policy.scope_of_ip(ip) for ip in (local_ips or [])} - {addr_policy.LOOPBACK}
    if scopes and scopes <= {addr_policy.PRIVATE, addr_policy.LINK_LOCAL, addr_policy.UNSPECIFIED}:
        return "client"
    return "server"
