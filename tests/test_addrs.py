"""synord.protocols.addrs: which addresses may leave the node, to whom (no sockets)."""

import pytest

from synord.protocols import addrs

P = "/p2p/12D3KooWabc"


@pytest.mark.parametrize("addr,scope", [
    ("/ip4/0.0.0.0/tcp/4001", "unspecified"),
    ("/ip6/::/tcp/4001", "unspecified"),
    ("/ip4/127.0.0.1/tcp/4001" + P, "loopback"),
    ("/ip6/::1/tcp/1", "loopback"),
    ("/ip4/169.254.3.4/tcp/1", "link-local"),
    ("/ip6/fe80::1/tcp/1", "link-local"),
    ("/ip4/192.168.1.10/tcp/4001", "private"),
    ("/ip4/10.1.2.3/tcp/1", "private"),
    ("/ip4/172.20.0.1/tcp/1", "private"),
    ("/ip4/100.64.0.9/tcp/1", "private"),
    ("/ip6/fd00::5/tcp/1", "private"),
    ("/ip4/198.18.0.11/tcp/4001", "public"),   # the testbed's internet: public on purpose
    ("/ip4/203.0.113.7/tcp/1", "public"),
    ("/ip4/8.8.8.8/tcp/1", "public"),
    ("/ip4/198.18.0.11/tcp/4001/p2p/12D3KooWrelay/p2p-circuit" + P, "public"),
    ("/dns4/example.org/tcp/1", "other"),
])
def test_scopes(addr, scope):
    assert addrs.scope(addr) == scope


def test_unspecified_is_never_told_nor_dialled():
    a = "/ip4/0.0.0.0/tcp/4001" + P
    assert not addrs.dialable(a)
    assert addrs.dial_candidates([a, "/ip4/127.0.0.1/tcp/1"]) == ["/ip4/127.0.0.1/tcp/1"]
    for seen in ("127.0.0.1", "192.168.1.2", "198.18.0.1", None):
        assert not addrs.may_tell(a, seen)


def test_own_addresses_by_where_the_peer_is():
    mine = ["/ip4/127.0.0.1/tcp/4001", "/ip4/192.168.1.10/tcp/4001", "/ip4/198.18.0.1/tcp/5123"]
    # a loopback peer (the local test meshes) gets everything but wildcards
    assert addrs.tell(mine, "/ip4/127.0.0.1/tcp/5555") == mine
    # a LAN peer gets the LAN and public addresses, not loopback
    assert addrs.tell(mine, "192.168.1.11") == mine[1:]
    # a peer on the internet gets only the public one
    assert addrs.tell(mine, "/ip4/198.18.0.11/tcp/4001") == mine[2:]
    # a relayed peer (seen at no address of its own) likewise
    assert addrs.tell(mine, None) == mine[2:]


def test_a_private_address_learnt_behind_one_router_never_goes_to_another_lan():
    b1 = ["/ip4/192.168.1.10/tcp/4001/p2p/B", "/ip4/198.18.0.2/tcp/4001/p2p/B"]
    # the anchor sees b1 at its router's public address, asker a1 likewise: only public
    assert addrs.tell_about(b1, "198.18.0.1", "198.18.0.2") == b1[1:]
    # even if the asker is on our LAN: b1 is not, its private address means someone else here
    assert addrs.tell_about(b1, "192.168.1.11", "198.18.0.2") == b1[1:]
    # both on our LAN: the private address is the useful one
    assert addrs.tell_about(b1, "192.168.1.11", "192.168.1.12") == b1
    # loopback meshes keep working: loopback peers learn loopback peers
    lo = ["/ip4/127.0.0.1/tcp/4002/p2p/C"]
    assert addrs.tell_about(lo, "127.0.0.1", "/ip4/127.0.0.1/tcp/4002") == lo
    assert addrs.tell_about(lo, "198.18.0.1", "127.0.0.1") == []
    assert addrs.tell_about(lo, "127.0.0.1", None) == lo  # not connected to C right now


def test_garbage_is_not_an_address_anybody_gets_confused_by():
    assert addrs.scope("/ip4/not-an-ip/tcp/1") == "other"
    assert addrs.ip_of("/tcp/1") is None
    assert addrs.scope("/ip6/::ffff:127.0.0.1/tcp/1") == "loopback"


def test_gossiped_addresses_are_public_unless_the_node_only_has_loopback():
    lo = ["/ip4/127.0.0.1/tcp/1/p2p/A"]
    home = lo + ["/ip4/192.168.1.10/tcp/1/p2p/A"]
    public = home + ["/ip4/198.18.0.11/tcp/1/p2p/A"]
    assert addrs.broadcastable(lo) == lo
    assert addrs.broadcastable(home) == []
    assert addrs.broadcastable(public) == public[2:]
