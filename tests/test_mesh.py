"""The mesh layer with real py-libp2p hosts in one process, on loopback."""

import struct

import msgpack
import pytest
import trio
import trio.testing

from synord.protocols import caps, topics
from synord.protocols.envelope import EnvelopeValidator, seal
from synord.protocols.framing import FramedStream, FrameError, RemoteError
from synord.protocols.identity import Identity
from synord.protocols.mesh import MeshConfig, envelope_validator, protocol_id
from synord.protocols.p2p import create_mesh
from synord.mesh_service import MeshService

ECHO = protocol_id("test-echo")


def cfg(**kw):
    return MeshConfig(listen=["/ip4/127.0.0.1/tcp/0"], mdns=False, **kw)


async def until(pred, timeout=15.0, what="condition"):
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.05)


# -- framing over an in-memory byte stream (no sockets) -----------------------

class _Mem:
    def __init__(self, s):
        self.s = s

    async def read(self, n):
        return await self.s.receive_some(n)

    async def write(self, data):
        await self.s.send_all(data)

    async def close(self):
        await self.s.aclose()

    async def reset(self):
        await self.s.aclose()


async def test_framing_roundtrip_and_defects():
    a, b = trio.testing.memory_stream_pair()
    fa, fb = FramedStream(_Mem(a)), FramedStream(_Mem(b), max_frame=1024)
    async with trio.open_nursery() as n:
        n.start_soon(fa.send, {"k": [1, 2]})
        assert await fb.receive() == {"k": [1, 2]}
        blob = bytes(range(256)) * 5000
        n.start_soon(fa.send_blob, blob)
        assert await fb.receive_blob() == blob
        n.start_soon(fa.send_blob, b"x" * 5000)
        with pytest.raises(FrameError, match="exceeds"):
            await fb.receive_blob(max_bytes=100)
    # oversized frame header, then a truncated frame, then garbage
    for raw, match in [(struct.pack(">I", 4096), "exceeds"), (struct.pack(">I", 10) + b"abc", "ended"),
                       (struct.pack(">I", 2) + b"\xc1\xc1", "malformed")]:
        a, b = trio.testing.memory_stream_pair()
        await a.send_all(raw)
        await a.aclose()
        with pytest.raises(FrameError, match=match):
            await FramedStream(_Mem(b), max_frame=1024).receive()
    a, b = trio.testing.memory_stream_pair()
    await FramedStream(_Mem(a)).send_error("no capacity")
    with pytest.raises(RemoteError, match="no capacity"):
        await FramedStream(_Mem(b)).receive_blob()


# -- security: only Noise is offered ------------------------------------------

def _ms(line: str) -> bytes:
    data = (line + "\n").encode()
    return bytes([len(data)]) + data


async def _negotiate(port: int, proto: str) -> bytes:
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(_ms("/multistream/1.0.0") + _ms(proto))
    got = b""
    with trio.move_on_after(5):
        while got.count(b"\n") < 2:
            chunk = await stream.receive_some(1024)
            if not chunk:
                break
            got += chunk
    await stream.aclose()
    return got


async def test_only_noise_offered():
    m = create_mesh(Identity.generate(), cfg())
    assert m.security_protocols() == ["/noise"]
    async with trio.open_nursery() as n:
        await n.start(m.run)
        port = int(m.listen_addrs()[0].split("/tcp/")[1].split("/")[0])
        for insecure in ("/plaintext/2.0.0", "/tls/1.0.0", "/secio/1.0.0"):
            assert (await _negotiate(port, insecure)).endswith(_ms("na")), insecure
        assert (await _negotiate(port, "/noise")).endswith(_ms("/noise"))
        n.cancel_scope.cancel()


# -- gossip, request/response, large payloads, peer exchange ------------------

async def test_three_nodes_gossip_request_and_64mib():
    a = create_mesh(Identity.generate(), cfg())
    async with trio.open_nursery() as n:
        await n.start(a.run)
        b = create_mesh(Identity.generate(), cfg(bootstrap=[a.listen_addrs()[0]]))
        c = create_mesh(Identity.generate(), cfg(bootstrap=[a.listen_addrs()[0]]))
        await n.start(b.run)
        await n.start(c.run)
        # b and c only know a: peer exchange must introduce them
        await until(lambda: c.peer_id in b.connected_peers(), what="px introduces b and c")
        assert all(x.startswith("/ip4/127.0.0.1/tcp/") and x.endswith("/p2p/" + a.peer_id)
                   for x in a.listen_addrs())

        async def echo(peer, payload):
            if payload == b"fail":
                raise ValueError("told to fail")
            return peer.encode() + b":" + payload[::-1]
        a.set_request_handler(ECHO, echo)
        assert await b.request(a.peer_id, ECHO, b"abc") == b.peer_id.encode() + b":cba"
        with pytest.raises(RemoteError, match="told to fail"):
            await c.request(a.peer_id, ECHO, b"fail")

        big = bytes(range(256)) * (64 * 1024 * 1024 // 256)
        reply = await b.request(a.peer_id, ECHO, big, timeout=120)
        assert len(reply) == len(big) + len(b.peer_id) + 1 and reply[-5:] == big[:5][::-1]

        subs = [await m.subscribe("t/test") for m in (a, b, c)]
        got = {0: [], 1: [], 2: []}

        async def collect(i):
            async for msg in subs[i]:
                got[i].append((msg.origin, msg.data))
        for i in range(3):
            n.start_soon(collect, i)
        sent = 0
        with trio.fail_after(15):  # the first publishes may precede the gossip mesh
            while not (got[0] and got[1]):
                sent += 1
                await c.publish("t/test", b"hello%d" % sent)
                await trio.sleep(0.3)
        assert got[0][-1][0] == c.peer_id and got[1][-1][1].startswith(b"hello")
        n.cancel_scope.cancel()


async def test_invalid_message_not_forwarded():
    """A -- B -- C in a line; B validates; C would see anything B forwarded."""
    topic = topics.orders("test")
    # no peer exchange and no DHT (its join lookup would connect c to a): a line it stays
    a = create_mesh(Identity.generate(), cfg(peer_exchange=False, dht="off"))
    b = create_mesh(Identity.generate(), cfg(peer_exchange=False, dht="off"))
    c = create_mesh(Identity.generate(), cfg(peer_exchange=False, dht="off"))
    bval = EnvelopeValidator()
    async with trio.open_nursery() as n:
        for m in (a, b, c):
            await n.start(m.run)
        await b.dial(a.listen_addrs()[0])
        await c.dial(b.listen_addrs()[0])
        await a.subscribe(topic)  # no validator on A: it sends whatever we publish
        bsub = await b.subscribe(topic, envelope_validator(bval, ["caps"]))
        csub = await c.subscribe(topic)
        assert a.peer_id not in c.connected_peers()

        good_body = {"profile": {}, "offer": {}, "addrs": [], "seq": 1}
        forged = seal(Identity.generate(), "caps", good_body).encode()  # signed by someone else
        raw = msgpack.unpackb(seal(a.identity, "caps", good_body).encode())
        raw["sig"] = bytes(64)
        bad_sig = msgpack.packb(raw)
        received = []

        async def collect():
            async for msg in csub:
                received.append(msg.data)
        n.start_soon(collect)
        with trio.fail_after(20):
            seq = 1
            while True:
                for bad in (forged, bad_sig, b"\xc1garbage"):
                    await a.publish(topic, bad)
                seq += 1
                good = seal(a.identity, "caps", dict(good_body, seq=seq)).encode()
                await a.publish(topic, good)
                await trio.sleep(0.3)
                if good in received:
                    break
        await trio.sleep(0.5)
        assert forged not in received and bad_sig not in received and b"\xc1garbage" not in received
        assert bval.rejected["sender_mismatch"] >= 1
        assert bval.rejected["bad_signature"] >= 1
        assert bval.rejected["malformed"] >= 1
        msg = await bsub.receive()
        assert msg.value.sender_id == a.peer_id and msg.value.type == "caps"
        n.cancel_scope.cancel()


# -- the daemon component ------------------------------------------------------

async def test_mesh_service_peer_table():
    def service(i, bootstrap):
        return MeshService(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"], bootstrap, mdns=False,
                           profile_provider=lambda: {"node": i, "host": {"cpus": 2}},
                           announce_interval_s=5)
    s0 = service(0, [])
    async with trio.open_nursery() as n:
        await n.start(s0.run)
        others = [service(i, [s0.listen_addrs()[0]]) for i in (1, 2)]
        scopes = []
        for s in others:
            scope = trio.CancelScope()
            scopes.append(scope)

            async def run(s=s, scope=scope, task_status=trio.TASK_STATUS_IGNORED):
                with scope:
                    await s.run(task_status=task_status)
            await n.start(run)
        allsvc = [s0, *others]

        def complete():
            for s in allsvc:
                table = {p["peer_id"]: p for p in s.peers_json()}
                want = {o.identity.peer_id: i for i, o in enumerate(allsvc) if o is not s}
                if set(table) != set(want):
                    return False
                for pid, i in want.items():
                    if (table[pid]["capabilities"] or {}).get("node") != i:
                        return False
            return True
        await until(complete, timeout=20, what="all peers with capabilities")
        entry = next(p for p in s0.peers_json() if p["peer_id"] == others[0].identity.peer_id)
        assert entry["addrs"] and all(a.endswith(others[0].identity.peer_id) for a in entry["addrs"])
        assert entry["last_seen"] > 0
        # stop node 2: its host shuts down, the others drop it
        scopes[1].cancel()
        gone = others[1].identity.peer_id
        await until(lambda: all(gone not in {p["peer_id"] for p in s.peers_json()} for s in (s0, others[0])),
                    timeout=30, what="stopped peer dropped")
        assert s0.rejected_counts() == {}
        n.cancel_scope.cancel()


def test_caps_refresh_period_grows_with_the_mesh():
    """Every node hears every refresh: the period stretches with the peers known, so
    each node hears about PEERS_PER_INTERVAL refreshes per announce_interval_s."""
    from synord.mesh_service import PEERS_PER_INTERVAL, PeerEntry
    s = MeshService(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"], [], mdns=False, announce_interval_s=30)
    assert s.period_s() == 30 and s.expiry_s == 90
    for i in range(4 * PEERS_PER_INTERVAL):
        s._peers[f"p{i}"] = PeerEntry(f"p{i}")
    assert s.period_s() == 4 * 30 and s.expiry_s == 3 * 4 * 30
