"""GossipSub mesh maintenance of our router (synord.protocols.p2p): a peer we prune
is backed off, so a later heartbeat does not GRAFT it again at once (py-libp2p
0.8.1 forgot this; the pruned peer took the GRAFT for a flood and pruned back)."""

from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11

from synord.protocols.identity import Identity
from synord.protocols.mesh import MeshConfig
from synord.protocols.p2p import create_mesh

TOPIC = "synord/test/1"


def _router_with_peers(n: int):
    mesh = create_mesh(Identity.generate(), MeshConfig(listen=["/ip4/127.0.0.1/tcp/0"], mdns=False))
    router = mesh.router
    peers = [ID.from_base58(Identity.generate().peer_id) for _ in range(n)]
    mesh.pubsub.peer_topics[TOPIC] = set(peers)
    for p in peers:
        router.peer_protocol[p] = PROTOCOL_ID_V11
    router.mesh[TOPIC] = set(peers)  # all of them grafted us: over degree_high
    return router, peers


def test_pruned_peers_are_backed_off_and_not_regrafted():
    router, peers = _router_with_peers(12)
    to_graft, to_prune = router.mesh_heartbeat()
    pruned = {p for p, ts in to_prune.items() if TOPIC in ts}
    assert len(pruned) == 12 - router.degree and not to_graft
    assert all(router._check_back_off(p, TOPIC) for p in pruned)
    # the rest of the mesh leaves: below degree_low, the router grafts again ...
    router.mesh[TOPIC] = set()
    to_graft, _ = router.mesh_heartbeat()
    regrafted = {p for p, ts in to_graft.items() if TOPIC in ts}
    # ... only peers it did not just prune (the spec's backoff)
    assert regrafted and not regrafted & pruned

