"""Stream hygiene against a hostile peer: a real daemon process, and the shared
hostile peer (`hostile.py`, our own libp2p host) that opens raw streams on
every /synord/ protocol the daemon serves and stalls them before the first
frame, between frames, or in the middle of a frame whose header declares 4 MiB.  Asserts: the stalled streams are reset after the configured
deadlines, the per-peer and global caps refuse the excess at once, each
refusal is counted in /metrics, and the daemon's memory goes back near where
it was once the streams are gone (psutil RSS, a generous bound).
"""

from __future__ import annotations

import http.client
import re
import struct
from contextlib import asynccontextmanager

import msgpack
import psutil
import pytest
import trio

from adversarial.hostile import HostilePeer
from synord.protocols.framing import MAX_FRAME
from synord.protocols.mesh import MeshError

FIRST_S, IDLE_S, FRAME_S = 2.0, 1.5, 1.5
CONFIG = f"""
[streams]
first_frame_s = {FIRST_S}
idle_s = {IDLE_S}
frame_s = {FRAME_S}
max_streams_per_peer = 32
max_streams_total = 48
max_buffered_per_peer = 12582912
max_buffered_total = 134217728
"""
# every stream protocol a provider daemon serves (checked against what identify reports)
EXPECTED = {"/synord/task/1.0.0", "/synord/transfer/1.0.0", "/synord/shell/1.0.0",
            "/synord/negotiate/1.0.0", "/synord/caps/1.0.0", "/synord/px/1.0.0", "/synord/kad/1.0.0"}
# framed by the library with varints: our 4 MiB header reads as a too-large message, reset at once
VARINT_FRAMED = {"/synord/kad/1.0.0"}
HEADER_4MIB = struct.pack(">I", MAX_FRAME)


async def in_thread(fn, *args):
    return await trio.to_thread.run_sync(lambda: fn(*args))


def metrics(d) -> dict[str, int]:
    """synord_refusals_total{where="streams"} by reason."""
    host, port = d.client.url.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {d.client.token}"})
    text = conn.getresponse().read().decode()
    out = {}
    for m in re.finditer(r'synord_refusals_total\{(.*?)\} ([0-9.e+]+)', text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("where") == "streams":
            out[labels["reason"]] = int(float(m.group(2)))
    return out


@asynccontextmanager
async def hostile_host(target_addr: str):
    """The shared hostile peer, connected to the daemon at ``target_addr``."""
    async with HostilePeer.running() as evil:
        evil.target = await evil.connect(target_addr)
        yield evil


async def open_raw(evil, protocol: str):
    """A stream whose raw side we drive: ``.raw.write`` anything, ``.raw.read`` (b"" once ended)."""
    return (await evil.open(evil.target, protocol)).raw


async def try_open(evil, protocol: str):
    """A stream, or None if the daemon refused it at once (reset during the handshake)."""
    try:
        return await open_raw(evil, protocol)
    except MeshError:
        return None


async def ended_by_peer(stream, within: float) -> bool:
    """True if the daemon ends (resets or closes) ``stream`` within ``within`` seconds."""
    if stream is None:
        return True
    with trio.move_on_after(within):
        while await stream.read(65536):
            pass
        return True  # b"": reset, closed or gone
    return False


async def served_protocols(evil) -> set[str]:
    from libp2p.peer.id import ID

    def known():
        try:
            return {str(p) for p in evil.mesh.host.get_peerstore().get_protocols(ID.from_base58(evil.target))}
        except Exception:  # identify has not answered yet
            return set()
    with trio.move_on_after(10):
        while not known() >= EXPECTED:
            await trio.sleep(0.1)
    return {p for p in known() if p.startswith("/synord/")}


def rss(d) -> int:
    return psutil.Process(d.pid).memory_info().rss


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One victim for the tests that only compare counters before and after."""
    from daemons import DaemonCluster
    with DaemonCluster(tmp_path_factory.mktemp("streams")) as c:
        yield c.start("victim", config=CONFIG)


async def test_stalled_streams_are_reset_on_every_protocol(daemon):
    addr = (await in_thread(daemon.p2p_addrs))[0]
    before = await in_thread(metrics, daemon)
    async with hostile_host(addr) as host:
        protocols = await served_protocols(host)
        assert protocols >= EXPECTED, f"identify did not list {EXPECTED - protocols}"
        # per protocol: 2 streams silent from the start, 2 with a 4 MiB header and 1 KiB of it
        silent, mid_frame = [], []
        for p in sorted(protocols):
            for _ in range(2):
                silent.append((p, await open_raw(host, p)))
                s = await open_raw(host, p)
                await s.write(HEADER_4MIB + b"\x00" * 1024)
                mid_frame.append((p, s))
        # streams the daemon serves with an idle deadline: one good frame, then silence
        # (negotiate reads frames in a loop; a request's blob header is its first frame)
        idle = await open_raw(host, "/synord/negotiate/1.0.0")
        body = msgpack.packb({"to": "provider", "env": b"not an envelope"})
        await idle.write(struct.pack(">I", len(body)) + body)
        blob = await open_raw(host, "/synord/px/1.0.0")
        head = msgpack.packb({"blob": 1000})
        await blob.write(struct.pack(">I", len(head)) + head + b"x" * 10)  # then stalls mid-blob

        async def expect_end(p, s, within, out):
            out.append((p, await ended_by_peer(s, within)))

        results: list[tuple[str, bool]] = []
        async with trio.open_nursery() as n:
            for p, s in silent + mid_frame + [("negotiate-idle", idle), ("px-midblob", blob)]:
                n.start_soon(expect_end, p, s, FIRST_S + FRAME_S + IDLE_S + 10, results)
        assert all(ok for _, ok in results), [p for p, ok in results if not ok]
        # a requester that takes its answer but never ends its side is reset (not left
        # holding the stream, and the bytes it may still push, after the handler is done)
        lingering = await open_raw(host, "/synord/px/1.0.0")
        head = msgpack.packb({"blob": 0})
        await lingering.write(struct.pack(">I", len(head)) + head)
        with trio.fail_after(10):
            assert await lingering.read(4)  # the answer came
        await trio.sleep(FRAME_S + 2)
        with pytest.raises(MeshError):  # reset by the daemon
            for _ in range(3):
                await lingering.write(b"junk" * 1024)
                await trio.sleep(0.2)
    after = await in_thread(metrics, daemon)
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert grew.get("first_frame_timeout", 0) >= len(silent), grew
    assert grew.get("frame_body_timeout", 0) >= len([p for p, _ in mid_frame if p not in VARINT_FRAMED]) + 1, grew
    assert grew.get("idle_timeout", 0) >= 1, grew
    log = daemon.log()
    assert "Traceback" not in log, log[-3000:]
    assert daemon.proc.poll() is None


async def test_stream_caps_refuse_the_excess(cluster):
    # deadlines long enough that every admitted stream is still open while we count
    daemon = await in_thread(lambda: cluster.start("patient", config=CONFIG.replace(
        f"first_frame_s = {FIRST_S}", "first_frame_s = 60.0")))
    addr = (await in_thread(daemon.p2p_addrs))[0]
    before = await in_thread(metrics, daemon)
    async with hostile_host(addr) as a, hostile_host(addr) as b:
        # 40 silent streams from one peer: 32 admitted, 8 refused by the per-peer cap at once
        from_a = [await try_open(a, "/synord/caps/1.0.0") for _ in range(40)]
        await trio.sleep(0.3)
        # the second peer's 24: only 16 fit under the global cap of 48
        from_b = [await try_open(b, "/synord/negotiate/1.0.0") for _ in range(24)]
        mid = await in_thread(metrics, daemon)
        ended_a = [await ended_by_peer(s, 0.05) for s in from_a]
        ended_b = [await ended_by_peer(s, 0.05) for s in from_b]
        assert sum(ended_a) == 8, ended_a
        assert sum(ended_b) == 8, ended_b
        grew = {k: mid.get(k, 0) - before.get(k, 0) for k in mid}
        assert grew.get("too_many_streams_peer") == 8, grew
        assert grew.get("too_many_streams_total") == 8, grew
        # streams the peer ends give their slots back: it may open new ones
        for s in from_a:
            if s is not None:
                await s.reset()
        await trio.sleep(0.5)
        again = await open_raw(a, "/synord/caps/1.0.0")
        payload = msgpack.packb({"blob": 0})
        await again.write(struct.pack(">I", len(payload)) + payload)
        with trio.fail_after(10):
            reply = await again.read(4)
        assert len(reply) == 4  # served: the slots were given back


async def test_buffered_bytes_capped_and_memory_returns(daemon):
    """Each stream sends a 4 MiB header and 1 MiB of the body, then stalls: without
    a cap 96 such streams would pin ~100 MiB; the per-peer cap (12 MiB) refuses
    all but a few, and what was held is released after the deadline."""
    addr = (await in_thread(daemon.p2p_addrs))[0]
    await trio.sleep(2)  # let start-up allocations settle
    baseline = rss(daemon)
    before = await in_thread(metrics, daemon)
    peak = baseline
    for round_ in range(4):  # 4 peers in turn, 24 streams each
        async with hostile_host(addr) as host:
            streams = [await open_raw(host, "/synord/transfer/1.0.0") for _ in range(24)]

            async def push(s):
                try:
                    await s.write(HEADER_4MIB + b"\xa5" * (1024 * 1024))
                except Exception:
                    pass  # refused mid-write: the point
            async with trio.open_nursery() as n:
                for s in streams:
                    n.start_soon(push, s)
            peak = max(peak, rss(daemon))
            ended = [await ended_by_peer(s, FRAME_S + 10) for s in streams]
            assert all(ended)
    after = await in_thread(metrics, daemon)
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert grew.get("buffered_bytes_peer", 0) >= 4 * 24 - 4 * 13, grew
    await trio.sleep(1)
    end = rss(daemon)
    mib = 1024 * 1024
    print(f"rss baseline {baseline / mib:.0f} MiB, peak {peak / mib:.0f} MiB, after {end / mib:.0f} MiB; "
          f"refusals {grew}")
    # held at once: at most the per-peer cap plus yamux windows and msgpack work
    assert peak - baseline < 80 * mib, (baseline // mib, peak // mib)
    assert end - baseline < 40 * mib, (baseline // mib, end // mib)
    assert daemon.proc.poll() is None
