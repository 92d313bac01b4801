"""Which addresses may leave this node, and to whom (sans-IO: strings in, strings out).

Scopes, by the first IP in a multiaddr (a /p2p-circuit address is the relay's IP first):
- ``unspecified`` 0.0.0.0/8, :: -- never dialable: never told, never dialled;
- ``loopback`` 127/8, ::1 -- only to a peer we reach over loopback (the local test meshes);
- ``link-local`` 169.254/16, fe80::/10 -- only to a peer on a link-local address;
- ``private`` RFC 1918, 100.64/10 (carrier-grade NAT), fc00::/7 -- only to a peer we see at
  a private address itself (same LAN or VPN, e.g. found by mDNS). A home LAN's 192.168.1.10
  means another machine on the next LAN: handing it across would make that peer dial itself;
- ``public`` everything else -- to anyone. This includes the IANA benchmarking and
  documentation ranges (198.18/15, 192.0.2/24, ...) that Python's ``is_private`` counts as
  private: test beds (tests/netlab.py) use them as "the internet".
An address with no IP (/dns4, /unix) is ``other``: told to anyone, the peer resolves it.
"""

from __future__ import annotations

import ipaddress

UNSPECIFIED, LOOPBACK, LINK_LOCAL, PRIVATE, PUBLIC, OTHER = (
    "unspecified", "loopback", "link-local", "private", "public", "other")

_PRIVATE_NETS = [ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")]
_UNSPECIFIED_NETS = [ipaddress.ip_network("0.0.0.0/8"), ipaddress.ip_network("::/128")]


def ip_of(addr: str) -> str | None:
    """The first /ip4/ or /ip6/ value of a multiaddr string, or None."""
    parts = addr.split("/")
    for i, proto in enumerate(parts[:-1]):
        if proto in ("ip4", "ip6"):
            return parts[i + 1]
    return None


def scope_of_ip(ip: str) -> str:
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return OTHER
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    if any(a in n for n in _UNSPECIFIED_NETS if n.version == a.version):
        return UNSPECIFIED
    if a.is_loopback:
        return LOOPBACK
    if a.is_link_local:
        return LINK_LOCAL
    if any(a in n for n in _PRIVATE_NETS if n.version == a.version):
        return PRIVATE
    return PUBLIC


def scope(addr: str) -> str:
    """The scope of a multiaddr string (see the module doc)."""
    ip = ip_of(addr)
    return OTHER if ip is None else scope_of_ip(ip)


def dialable(addr: str) -> bool:
    """False for addresses nobody can dial (0.0.0.0, ::)."""
    return scope(addr) != UNSPECIFIED


def may_tell(addr: str, peer_seen_at: str | None) -> bool:
    """May ``addr`` (ours or a third party's) be handed to a peer whose connection to us
    comes from ``peer_seen_at`` (a multiaddr or a bare IP; None when unknown, e.g. relayed)?"""
    s = scope(addr)
    if s in (PUBLIC, OTHER):
        return True
    if s == UNSPECIFIED or peer_seen_at is None:
        return False
    seen = scope(peer_seen_at) if "/" in peer_seen_at else scope_of_ip(peer_seen_at)
    if s == LOOPBACK:
        return seen == LOOPBACK
    if s == LINK_LOCAL:
        return seen in (LINK_LOCAL, LOOPBACK)
    return seen in (PRIVATE, LOOPBACK)  # private: the peer is on a private network with us


def tell(addrs: list[str], peer_seen_at: str | None) -> list[str]:
    """Which of our own ``addrs`` may go to a peer seen at ``peer_seen_at``."""
    return [a for a in addrs if may_tell(a, peer_seen_at)]


def tell_about(addrs: list[str], peer_seen_at: str | None, third_seen_at: str | None) -> list[str]:
    """Which of a third party's ``addrs`` (peer exchange) may go to a peer seen at
    ``peer_seen_at``, when we see that third party at ``third_seen_at``. Its non-public
    addresses only help when both are on a private network with us: one learnt from a peer
    behind another router never goes out. (Loopback ones go to loopback peers only: all
    three are on this machine.)"""
    return [a for a in addrs if may_tell(a, peer_seen_at)
            and (scope(a) in (PUBLIC, OTHER, LOOPBACK) or may_tell(a, third_seen_at))]


def broadcastable(mine: list[str]) -> list[str]:
    """Our addresses for a message every peer reads (gossiped capabilities): the public ones;
    a node with no public or private address (a loopback test mesh) keeps its loopback ones,
    the only ones its peers can use."""
    scopes = {scope(a) for a in mine}
    if scopes & {PUBLIC, OTHER, PRIVATE}:
        return [a for a in mine if scope(a) in (PUBLIC, OTHER)]
    return [a for a in mine if scope(a) == LOOPBACK]


def dial_candidates(addrs: list[str]) -> list[str]:
    """The addresses worth dialling: never an unspecified one."""
    return [a for a in addrs if dialable(a)]
