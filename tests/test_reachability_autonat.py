"""AutoNAT's server side with real py-libp2p hosts on loopback: a dial-back proves the asker
answers there on a fresh connection; requests for someone else are refused and counted."""

import multiaddr
import pytest
import trio
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID

from synord.protocols.identity import Identity
from synord.protocols.mesh import MeshConfig, MeshError
from synord.protocols.p2p import create_mesh
from synord.protocols.refusals import REFUSALS


def cfg(**kw):
    return MeshConfig(listen=["/ip4/127.0.0.1/tcp/0"], mdns=False, peer_exchange=False, **kw)


async def until(pred, timeout=15.0):
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.05)


async def test_dial_back_is_a_fresh_connection_to_the_asker_only():
    a = create_mesh(Identity.generate(), cfg())
    async with trio.open_nursery() as n:
        await n.start(a.run)
        b = create_mesh(Identity.generate(), cfg(bootstrap=[a.listen_addrs()[0]]))
        await n.start(b.run)
        await until(lambda: a.peer_id in b.connected_peers())
        server = ID.from_base58(a.peer_id)
        mine = [multiaddr.Multiaddr(x.split("/p2p/")[0]).to_bytes() for x in b.listen_addrs()]

        # b listens there: a reaches it on a new connection and b's Noise key answers
        status, addr = await b.autonat.query_server(server, mine, timeout=15)
        assert status == Message.OK and addr in mine

        # nothing listens at port 1: already connected or not, the answer is "could not"
        # (py-libp2p's own server answered OK here: it "dialled" the existing connection)
        closed = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/1").to_bytes()
        status, _ = await b.autonat.query_server(server, [closed], timeout=15)
        assert status == Message.E_DIAL_ERROR

        # b asks a to dial a third peer: refused, counted
        before = REFUSALS.get("autonat", "bad-request")
        other = Identity.generate()
        b.autonat.host.get_id = lambda: ID.from_base58(other.peer_id)  # lie about who asks
        try:
            status, _ = await b.autonat.query_server(server, mine, timeout=15)
        finally:
            del b.autonat.host.get_id
        assert status == Message.E_BAD_REQUEST
        assert REFUSALS.get("autonat", "bad-request") == before + 1
        n.cancel_scope.cancel()


async def test_nobody_dials_an_unspecified_address():
    a = create_mesh(Identity.generate(), cfg())
    async with trio.open_nursery() as n:
        await n.start(a.run)
        before = REFUSALS.get("dial", "unspecified-address")
        other = Identity.generate().peer_id
        with pytest.raises(MeshError, match="no dialable address"):
            await a.dial(f"/ip4/0.0.0.0/tcp/4001/p2p/{other}")
        assert REFUSALS.get("dial", "unspecified-address") == before + 1
        assert a.reachability_json()["dials"].get("unspecified", 0) == 0
        assert all("0.0.0.0" not in x for x in a.listen_addrs())
        n.cancel_scope.cancel()
