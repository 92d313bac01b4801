"""The daemon's mesh component: runs the mesh, announces capabilities, keeps the peer table.

A peer is in the table while we are connected to it or while its signed
``caps`` announcements keep arriving (within ``3 x announce_interval``).  A
direct disconnect removes it at once; a later announcement with a higher seq
brings it back.  Announcements go out on start, on
`notify_profile_changed()`, shortly after a new connection (so a newcomer
learns us without waiting for the period), and every ``period_s()``:
``announce_interval_s``, stretched in proportion to the peers we know beyond
PEERS_PER_INTERVAL, so each node hears a bounded number of refreshes per second
however large the mesh (every node receives every announcement: with a fixed
period the idle cost per node grew with N).  The expiry stretches alike.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from synord.protocols import caps, topics
from synord.protocols.addrs import broadcastable
from synord.protocols.envelope import MAX_ENVELOPE_BYTES, Envelope, EnvelopeValidator
from synord.protocols.identity import Identity
from synord.protocols.mesh import Mesh, MeshConfig, envelope_validator, protocol_id

log = logging.getLogger("synord.mesh")

CAPS_SYNC = protocol_id("caps")  # /synord/caps/1.0.0
SYNC_MAX = 1024
PEERS_PER_INTERVAL = 10  # refreshes heard per announce_interval_s at most, on average


def parse_sync_reply(reply: bytes) -> list[bytes]:
    """A caps-sync answer: a list of encoded envelopes (each still to be validated).
    Raises ValueError if it is not a list; entries that are not bytes are skipped."""
    try:
        items = msgpack.unpackb(reply, raw=False, max_array_len=SYNC_MAX, max_map_len=0,
                                max_bin_len=MAX_ENVELOPE_BYTES, max_ext_len=0)
    except Exception as exc:  # msgpack raises many types on garbage
        raise ValueError(f"sync reply is not msgpack: {type(exc).__name__}") from None
    if not isinstance(items, list):
        raise ValueError("sync reply is not a list")
    return [d for d in items if isinstance(d, bytes)]


@dataclass
class PeerEntry:
    peer_id: str
    addrs: list[str] = field(default_factory=list)
    capabilities: dict | None = None
    offer: dict | None = None
    seq: int = -1
    last_seen: float = 0.0
    connected: bool = False
    envelope: bytes | None = None  # the signed announcement, served to caps sync

    def to_json(self) -> dict:
        return {"peer_id": self.peer_id, "addrs": self.addrs, "capabilities": self.capabilities,
                "offer": self.offer, "last_seen": self.last_seen, "connected": self.connected}


class MeshService:
    def __init__(self, identity: Identity, listen: list[str], bootstrap: list[str] | None = None,
                 mdns: bool = True, profile_provider: Callable[[], dict | None] = lambda: None,
                 announce_interval_s: float = 15.0, offer_provider: Callable[[], dict] | None = None,
                 mesh: Mesh | None = None, **mesh_options: Any):
        self.identity = identity
        self.profile_provider = profile_provider
        self.offer_provider = offer_provider
        self.announce_interval_s = announce_interval_s
        if mesh is None:
            from synord.protocols.p2p import create_mesh  # heavy (libp2p): only when a mesh starts
        self.mesh = mesh or create_mesh(identity, MeshConfig(
            listen=list(listen), bootstrap=list(bootstrap or []), mdns=mdns, **mesh_options))
        self.validator = EnvelopeValidator()
        self.sync_validator = EnvelopeValidator()
        self._own: bytes | None = None
        self._own_ready = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._peers: dict[str, PeerEntry] = {}
        self._best_seq: dict[str, int] = {}  # survives removal: stale gossip can't resurrect a peer
        self._seq = caps.SeqCounter()
        self._announce_now = trio.Event()
        self.announced = 0
        # optional observer of accepted announcements: fn(peer_id, envelope); used by bench/
        self.on_caps: Callable[[str, Envelope], None] | None = None

    # -- the daemon's view ---------------------------------------------------
    def listen_addrs(self) -> list[str]:
        return self.mesh.listen_addrs()

    def peers_json(self) -> list[dict]:
        self._expire(time.time())
        return [e.to_json() for e in sorted(self._peers.values(), key=lambda e: e.peer_id)]

    def rejected_counts(self) -> dict[str, int]:
        return dict(self.validator.rejected)

    def period_s(self) -> float:
        """The refresh period: grows with the mesh (every node hears every refresh)."""
        return self.announce_interval_s * max(1.0, len(self._peers) / PEERS_PER_INTERVAL)

    @property
    def expiry_s(self) -> float:
        # 3 periods: a peer that knows somewhat more peers than we do refreshes less often
        return 3 * self.period_s()

    def notify_profile_changed(self) -> None:
        self._announce_now.set()

    # -- running ---------------------------------------------------------------
    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.mesh.set_request_handler(CAPS_SYNC, self._serve_sync, max_request=1024)
            await nursery.start(self.mesh.run)
            events = self.mesh.events()
            caps_in = await self.mesh.subscribe(
                topics.CAPS, envelope_validator(self.validator, [caps.TYPE], self._log_reject))
            nursery.start_soon(self._watch_connections, events)
            nursery.start_soon(self._receive_caps, caps_in)
            nursery.start_soon(self._announce_loop)
            task_status.started()

    def _log_reject(self, rejected) -> None:
        log.info("rejected caps envelope: %s %s", rejected.reason, rejected.detail)

    async def _announce_loop(self) -> None:
        while True:
            try:
                await self.announce()
            except Exception as exc:  # a bad profile must not stop the node; try again later
                log.warning("caps announcement failed: %s: %s", type(exc).__name__, exc)
            with trio.move_on_after(self.period_s() * random.uniform(0.9, 1.0)):  # spread out
                await self._announce_now.wait()
            self._announce_now = trio.Event()
            await trio.sleep(1.0)  # coalesce bursts of profile changes

    async def announce(self) -> int:
        """Publish our caps envelope now; returns its seq."""
        profile = self.profile_provider() or {}
        offer = self.offer_provider() if self.offer_provider else (
            profile.get("offer") or profile.get("offerable") or {})
        # gossip reaches every LAN: no private or loopback address in it (synord.protocols.addrs)
        env = caps.make_caps(self.identity, profile, offer, broadcastable(self.listen_addrs()),
                             self._seq.next())
        data = env.encode()
        self._own = data
        self._own_ready.set()
        await self.mesh.publish(topics.CAPS, data)
        self.announced += 1
        return env.body["seq"]

    async def _receive_caps(self, channel) -> None:
        async for msg in channel:
            if msg.value is not None and msg.origin != self.identity.peer_id:
                self._apply(msg.origin, msg.value, msg.data)

    def _apply(self, origin: str, env: Envelope, data: bytes) -> None:
        body = env.body
        if body["seq"] <= self._best_seq.get(origin, -1):
            return
        self._best_seq[origin] = body["seq"]
        entry = self._peers.setdefault(origin, PeerEntry(origin))
        entry.capabilities = body["profile"]
        entry.offer = body["offer"]
        entry.seq = body["seq"]
        entry.addrs = [a for a in body["addrs"] if a.endswith("/p2p/" + origin)] or entry.addrs
        # when it was announced (a synced envelope may be older than its arrival)
        entry.last_seen = max(entry.last_seen, min(time.time(), env.timestamp_ms / 1000))
        entry.envelope = data
        if self.on_caps is not None:
            self.on_caps(origin, env)

    # -- caps sync: a newly connected peer hands us every announcement it holds,
    # so joining costs one request instead of mesh-wide re-announcements.
    async def _serve_sync(self, peer_id: str, payload: bytes) -> bytes:
        self._expire(time.time())
        held = [e.envelope for e in self._peers.values() if e.envelope and e.peer_id != peer_id]
        with trio.move_on_after(5):  # a peer may connect before our first announcement
            await self._own_ready.wait()
        if self._own:
            held.append(self._own)
        return msgpack.packb(held[:SYNC_MAX], use_bin_type=True)

    async def _sync_from(self, peer_id: str) -> None:
        # a loaded peer may time out: retry while connected and still unknown
        for delay in (0, 3, 6, 12):
            await trio.sleep(delay)
            entry = self._peers.get(peer_id)
            if entry is None or (delay and entry.envelope is not None):
                return
            await self._sync_once(peer_id)

    async def _sync_once(self, peer_id: str) -> None:
        try:
            reply = await self.mesh.request(peer_id, CAPS_SYNC, b"", timeout=15,
                                            max_reply=SYNC_MAX * MAX_ENVELOPE_BYTES)
            items = parse_sync_reply(reply)
        except Exception as exc:
            log.debug("caps sync from %s failed: %s", peer_id[:16], exc)
            return
        for data in items:
            env = self.sync_validator.check(data)  # own replay memory: gossip is unaffected
            if isinstance(env, Envelope) and env.type == caps.TYPE and env.sender_id != self.identity.peer_id:
                self._apply(env.sender_id, env, data)

    async def _watch_connections(self, events) -> None:
        async for ev in events:
            if ev.kind == "connected":
                entry = self._peers.setdefault(ev.peer_id, PeerEntry(ev.peer_id))
                entry.connected = True
                entry.last_seen = time.time()
                if not entry.addrs:
                    entry.addrs = self.mesh.peer_addrs(ev.peer_id)
                self._nursery.start_soon(self._sync_from, ev.peer_id)
                if len(self.mesh.connected_peers()) == 1:
                    # first link into the mesh (start, or after isolation): the
                    # gossip mesh needs a moment, then everyone should hear us
                    self._nursery.start_soon(self._announce_soon, 1.5)
            else:
                self._peers.pop(ev.peer_id, None)

    async def _announce_soon(self, delay: float) -> None:
        await trio.sleep(delay)
        self._announce_now.set()

    def _expire(self, now: float) -> None:
        for pid, entry in list(self._peers.items()):
            if not entry.connected and now - entry.last_seen > self.expiry_s:
                del self._peers[pid]
