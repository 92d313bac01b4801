"""The synord Kademlia DHT: its rules without sockets, then real py-libp2p hosts
on loopback (peer routing, providers by class, client mode, never IPFS's DHT)."""

import pytest
import trio

from synord.protocols import kad
from synord.protocols.identity import Identity
from synord.protocols.mesh import MeshConfig
from synord.protocols.refusals import REFUSALS

# -- rules (no sockets) ----------------------------------------------------------


def test_class_key_is_a_sha256_multihash_per_class():
    cpu, gpu = kad.class_key("cpu"), kad.class_key("gpu-a100")
    assert cpu[:2] == b"\x12\x20" and len(cpu) == 34
    assert cpu != gpu and cpu == kad.class_key("cpu")
    for bad in ("", "x" * 65):
        with pytest.raises(ValueError):
            kad.class_key(bad)


@pytest.mark.parametrize("addr,why", [
    ("/ip4/127.0.0.1/tcp/4001", None),
    ("/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWExample", None),
    ("/ip6/2001:db8::1/tcp/4001", None),
    ("/dns4/anchor.example.org/tcp/4001", None),
    ("/ip4/198.51.100.2/tcp/4001/p2p/12D3KooWRelay/p2p-circuit", None),
    ("/ip4/0.0.0.0/tcp/4001", "unspecified-address"),
    ("/ip6/::/tcp/4001", "unspecified-address"),
    ("/ip4/0.1.2.3/tcp/4001", "unspecified-address"),
    ("/ip4/224.0.0.251/tcp/5353", "multicast-address"),
    ("/ip4/255.255.255.255/tcp/1", "multicast-address"),
    ("/ip4/10.0.0.1/tcp/0", "bad-port"),
    ("/ip4/10.0.0.1/tcp/70000", "bad-port"),
    ("/ip4/10.0.0.1/udp/4001/quic", "not-tcp"),
    ("/ip4/999.0.0.1/tcp/4001", "bad-address"),
    ("/ip6/127.0.0.1/tcp/4001", "bad-address"),
    ("/p2p-circuit", "bad-address"),
    ("not a multiaddr", "bad-address"),
    ("/ip4/10.0.0.1/tcp/" + "1" * 300, "bad-address"),
])
def test_check_addr(addr, why):
    assert kad.check_addr(addr) == why


def test_sanitize_keeps_a_few_distinct_good_addresses():
    good = [f"/ip4/127.0.0.1/tcp/{4000 + i}" for i in range(kad.MAX_ADDRS_PER_PEER + 2)]
    kept, refused = kad.sanitize_addrs(["/ip4/0.0.0.0/tcp/1", good[0], good[0], *good[1:]])
    assert kept == good[:kad.MAX_ADDRS_PER_PEER]
    assert refused == ["unspecified-address", "too-many-addresses", "too-many-addresses"]


@pytest.mark.parametrize("setting,reach,ips,mode", [
    ("auto", "public", ["192.168.1.5"], "server"),
    ("auto", "private", ["203.0.113.7"], "client"),
    ("auto", "unknown", ["127.0.0.1"], "server"),              # a loopback test mesh
    ("auto", "unknown", ["127.0.0.1", "192.168.1.5"], "client"),  # a home LAN
    ("auto", "unknown", ["10.0.0.2", "93.184.216.34"], "server"),
    ("auto", "unknown", ["100.64.3.4"], "client"),  # carrier-grade NAT
    ("client", "public", ["203.0.113.7"], "client"),
    ("server", "private", ["192.168.1.5"], "server"),
    ("off", "public", [], "off"),
])
def test_choose_mode(setting, reach, ips, mode):
    assert kad.choose_mode(setting, reach, ips) == mode


def test_choose_mode_refuses_an_unknown_setting():
    with pytest.raises(ValueError):
        kad.choose_mode("maybe")


def _refusals(reason: str) -> int:
    return REFUSALS.get("dht", reason)


def test_provider_store_refuses_undialable_records_and_bounds_keys(monkeypatch):
    from libp2p.peer.peerinfo import PeerInfo
    from multiaddr import Multiaddr
    from synord.protocols import dht
    from synord.protocols.p2p import create_mesh

    mesh = create_mesh(Identity.generate(), MeshConfig(listen=["/ip4/127.0.0.1/tcp/0"], mdns=False))
    store = mesh.dht.provider_store
    other = create_mesh(Identity.generate(), MeshConfig(listen=["/ip4/127.0.0.1/tcp/0"], mdns=False,
                                                        dht="off")).host.get_id()
    key = kad.class_key("cpu")
    before = _refusals("no-address"), _refusals("unspecified-address")
    store.add_provider(key, PeerInfo(other, [Multiaddr("/ip4/0.0.0.0/tcp/4001")]))
    assert store.get_providers(key) == []
    assert (_refusals("no-address"), _refusals("unspecified-address")) == (before[0] + 1, before[1] + 1)

    store.add_provider(key, PeerInfo(other, [Multiaddr("/ip4/0.0.0.0/tcp/4001"),
                                             Multiaddr("/ip4/127.0.0.1/tcp/4001")]))
    [found] = store.get_providers(key)
    assert [str(a) for a in found.addrs] == ["/ip4/127.0.0.1/tcp/4001"]

    monkeypatch.setattr(dht, "MAX_PROVIDER_KEYS", 3)
    full = _refusals("store-full")
    for cls in ("a", "b", "c", "d"):
        store.add_provider(kad.class_key(cls), PeerInfo(other, [Multiaddr("/ip4/127.0.0.1/tcp/4001")]))
    assert len(store.providers) == 3 and _refusals("store-full") == full + 2


# -- real hosts on loopback ----------------------------------------------------------


def cfg(**kw):
    return MeshConfig(listen=["/ip4/127.0.0.1/tcp/0"], mdns=False, peer_exchange=False, **kw)


async def until(pred, timeout=15.0, what="condition"):
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.05)


async def _start(nursery, mesh):
    await nursery.start(mesh.run)
    return mesh


async def test_line_of_three_finds_a_peer_and_a_class_provider_through_the_middle():
    """a - b - c, no peer exchange: c learns a's address and a's class from the DHT."""
    from multiaddr import Multiaddr
    from synord.protocols.p2p import create_mesh
    async with trio.open_nursery() as nursery:
        a = await _start(nursery, create_mesh(Identity.generate(), cfg()))
        b = await _start(nursery, create_mesh(Identity.generate(), cfg(bootstrap=[a.listen_addrs()[0]])))
        c = await _start(nursery, create_mesh(Identity.generate(), cfg(bootstrap=[b.listen_addrs()[0]])))
        await until(lambda: b.dht.routing_table.size() == 2, what="b's routing table")
        # c's join lookup may have met a already: make c forget it (a "moved" peer)
        a_id = a.host.get_id()
        if a.peer_id in c.connected_peers():
            await c.host.disconnect(a_id)
        c.host.get_peerstore().clear_addrs(a_id)
        assert a.peer_id not in c.connected_peers() and not c.peer_addrs(a.peer_id)

        addrs = await c.find_peer(a.peer_id)
        assert addrs and all(kad.check_addr(x) is None for x in addrs)
        assert all(x.endswith(f"/p2p/{a.peer_id}") for x in addrs)
        assert await c.reach(a.peer_id, [])  # no address given: found through the DHT
        assert a.peer_id in c.connected_peers()

        # a stream to a peer whose known addresses fail (a receipt to a consumer that
        # moved, a negotiation with a provider known from its ask) asks the DHT too
        async def echo(peer, payload):
            return payload
        a.set_request_handler("/synord/test-echo/1.0.0", echo)
        await c.host.disconnect(a_id)
        c.host.get_peerstore().clear_addrs(a_id)
        c.host.get_peerstore().add_addrs(a_id, [Multiaddr("/ip4/127.0.0.1/tcp/1")], 60)  # stale
        assert await c.request(a.peer_id, "/synord/test-echo/1.0.0", b"hi", timeout=20) == b"hi"

        key = kad.class_key("gpu-h200")
        a.provide(key)
        await until(lambda: b.dht.provider_store.get_providers(key), what="b holds a's record")
        found = await c.find_providers(key)
        assert [p for p, _ in found] == [a.peer_id]
        assert all(kad.check_addr(x) is None for x in found[0][1])
        assert await c.find_providers(kad.class_key("nobody-has-this")) == []
        nursery.cancel_scope.cancel()


async def test_a_client_mode_node_is_in_no_routing_table_and_still_finds_providers():
    from synord.protocols.p2p import create_mesh
    async with trio.open_nursery() as nursery:
        a = await _start(nursery, create_mesh(Identity.generate(), cfg()))
        b = await _start(nursery, create_mesh(Identity.generate(), cfg(bootstrap=[a.listen_addrs()[0]])))
        home = await _start(nursery, create_mesh(Identity.generate(),
                                                 cfg(dht="client", bootstrap=[b.listen_addrs()[0]])))
        assert home.dht_json()["mode"] == "client"
        await until(lambda: a.dht.routing_table.size() == 1 and home.dht.routing_table.size() >= 1,
                    what="routing tables")
        key = kad.class_key("cpu")
        a.provide(key)
        await until(lambda: b.dht.provider_store.get_providers(key), what="b holds a's record")
        assert [p for p, _ in await home.find_providers(key)] == [a.peer_id]
        await trio.sleep(0.5)  # identify has long run: b would have added it by now
        assert not b.dht.routing_table.peer_in_table(home.host.get_id())
        nursery.cancel_scope.cancel()


async def test_a_peer_of_ipfs_dht_never_joins_and_refuses_ours():
    """A host serving /ipfs/kad/1.0.0 (IPFS's DHT id) is not added to our routing table,
    our DHT never speaks that id to it, and it cannot speak to ours."""
    from libp2p.peer.id import ID
    from synord.protocols.p2p import create_mesh
    asked = []

    async def ipfs_kad(stream):
        asked.append(stream)
        await stream.reset()

    async with trio.open_nursery() as nursery:
        ours = await _start(nursery, create_mesh(Identity.generate(), cfg()))
        ipfs = create_mesh(Identity.generate(), cfg(dht="off", bootstrap=[ours.listen_addrs()[0]]))
        ipfs.host.set_stream_handler(kad.IPFS_PROTOCOL, ipfs_kad)
        await _start(nursery, ipfs)
        await until(lambda: ours.dht._protocols(ipfs.host.get_id()), what="identify")
        await trio.sleep(0.3)  # peer_connected has seen identify's answer
        assert kad.IPFS_PROTOCOL in ours.host.get_peerstore().get_protocols(ipfs.host.get_id())
        assert not ours.dht.routing_table.peer_in_table(ipfs.host.get_id())
        assert await ours.find_peer(Identity.generate().peer_id) == []  # a lookup: connected peers asked
        assert asked == []
        with pytest.raises(Exception):
            await ipfs.host.new_stream(ID.from_base58(ours.peer_id), [kad.IPFS_PROTOCOL])
        nursery.cancel_scope.cancel()


# -- real daemons ------------------------------------------------------------------------

PX_OFF = "[node]\npeer_exchange = false\n"


def test_without_peer_exchange_the_dht_connects_a_consumer_to_a_provider_two_hops_away(cluster):
    """provider - middle - consumer, no peer exchange: the provider's asks reach the
    consumer by gossip through the middle; only the DHT (the consumer's join lookup,
    or a peer-routing lookup when it negotiates) gives the consumer an address for
    the provider, to negotiate, run the task and get its receipt."""
    from daemons import wait_for
    from jobs_helpers import CONSUMER_ONLY, PROBE_WASM, ensure_assets, providers_in_book, submit, wait_job
    ensure_assets()
    prov = cluster.start("provider", config=PX_OFF)
    mid = cluster.start("middle", bootstrap=prov.p2p_addrs(), config=PX_OFF + CONSUMER_ONLY)
    cons = cluster.start("consumer", bootstrap=mid.p2p_addrs(), config=PX_OFF + CONSUMER_ONLY)
    pid = prov.status()["peer_id"]
    wait_for(lambda: pid in providers_in_book(cons), 40, what="the provider's ask at the consumer")

    job_id = submit(cons, str(PROBE_WASM), "--", "hello")
    assert wait_job(cons, job_id)["state"] == "succeeded"
    assert any(p["peer_id"] == pid and p["connected"] for p in cons.get("/v1/peers"))
    assert cons.status()["dht"]["routing_table"] == 2
    wait_for(lambda: cons.get("/v1/ledger")["receipts"], 30, what="the receipt at the consumer")
    assert {d.status()["dht"]["mode"] for d in (prov, mid, cons)} == {"server"}
    assert prov.status()["dht"]["providing"] == 1  # its class, "cpu"


async def test_a_consumer_finds_the_providers_of_a_class_in_the_dht(cluster, tmp_path):
    """The consumer and the provider daemon share only a DHT-only anchor (no market, no
    order topic): the consumer's bid finds no ask, so it looks the class up in the DHT,
    dials the provider, and hears its ask."""
    from daemons import wait_for
    from jobs_helpers import ensure_assets
    from synord.market.port import Needs
    from synord.market.pricing import PricingPolicy
    from synord.market.service import MarketService
    from synord.protocols.p2p import create_mesh
    from synord.store import Store
    ensure_assets()
    async with trio.open_nursery() as nursery:
        anchor = await _start(nursery, create_mesh(Identity.generate(), cfg()))
        boot = anchor.listen_addrs()
        prov = await trio.to_thread.run_sync(lambda: cluster.start("provider", bootstrap=boot, config=PX_OFF))
        pid = (await trio.to_thread.run_sync(prov.status))["peer_id"]
        await until(lambda: anchor.dht.provider_store.get_providers(kad.class_key("cpu")), 40,
                    what="the provider's class record at the anchor")

        mesh = await _start(nursery, create_mesh(Identity.generate(), cfg(bootstrap=boot)))
        svc = MarketService(mesh.identity, Store(tmp_path / "state.db"), mesh, offer=dict,
                            contributing=lambda: False, policy=PricingPolicy(), classes=lambda: ["cpu"])
        await nursery.start(svc.run)
        needs = Needs(runtime="wasm", cores=0.5, memory=64 << 20, max_price=None, duration_s=600)
        await until(lambda: anchor.peer_id in mesh.connected_peers(), what="consumer at the anchor")
        assert svc.candidates(needs) == [] and pid not in mesh.connected_peers()
        await svc.announce_bid(needs, "bid-1")
        await until(lambda: [c for c in svc.candidates(needs) if c.ask.peer == pid], 30,
                    what="the provider's ask at the consumer")
        assert mesh.dht.lookups["find_providers"] == 1
        nursery.cancel_scope.cancel()


async def test_hostile_provider_records_and_silent_streams_are_refused_and_counted(monkeypatch):
    """Over the wire: an ADD_PROVIDER naming only 0.0.0.0 is not stored (counted), one
    naming another peer as provider is not stored (the library's check), and a DHT
    stream that goes silent is reset at its deadline (counted)."""
    import varint
    from libp2p.kad_dht.pb.kademlia_pb2 import Message
    from libp2p.peer.id import ID
    from multiaddr import Multiaddr
    from synord.protocols import dht
    from synord.protocols.p2p import create_mesh
    monkeypatch.setattr(dht, "INBOUND_STREAM_S", 1.0)

    async def send(stream, key: bytes, provider_id: bytes, addrs: list[str]) -> None:
        msg = Message()
        msg.type = Message.MessageType.ADD_PROVIDER
        msg.key = key
        prov = msg.providerPeers.add()
        prov.id = provider_id
        prov.addrs.extend(Multiaddr(a).to_bytes() for a in addrs)
        raw = msg.SerializeToString()
        await stream.write(varint.encode(len(raw)) + raw)

    async with trio.open_nursery() as nursery:
        ours = await _start(nursery, create_mesh(Identity.generate(), cfg()))
        evil = await _start(nursery, create_mesh(Identity.generate(), cfg(dht="off",
                                                                          bootstrap=[ours.listen_addrs()[0]])))
        await until(lambda: ours.peer_id in evil.connected_peers(), what="connected")
        store, key = ours.dht.provider_store, kad.class_key("cpu")
        before = _refusals("no-address"), _refusals("stream-deadline")
        stream = await evil.host.new_stream(ID.from_base58(ours.peer_id), [kad.PROTOCOL])
        await send(stream, key, evil.host.get_id().to_bytes(), ["/ip4/0.0.0.0/tcp/4001"])
        someone_else = ID.from_base58(Identity.generate().peer_id).to_bytes()
        await send(stream, key, someone_else, ["/ip4/127.0.0.1/tcp/4001"])
        await until(lambda: _refusals("no-address") == before[0] + 1, what="the 0.0.0.0 record refused")
        assert store.get_providers(key) == []
        # the stream stays open, silent: reset at the deadline
        await until(lambda: _refusals("stream-deadline") == before[1] + 1, timeout=10, what="deadline")
        with trio.fail_after(5):  # stuck (not reset) fails the test
            with pytest.raises(Exception):
                await send(stream, key, evil.host.get_id().to_bytes(), ["/ip4/127.0.0.1/tcp/4001"])
                await stream.read(1)  # reset by ours
        assert store.get_providers(key) == []
        nursery.cancel_scope.cancel()
