"""The daemon's mesh component: runs the mesh, announces capabilities, keeps the peer table.

A peer is in the table while we are connected to it or while its signed
``caps`` announcements keep arriving (within ``3 x announce_interval``).  A
direct disconnect removes it at once; a later announcement with a higher seq
brings it back.  Announcements go out on start, on
`notify_profile_changed()`, shortly after a new connection (so a newcomer
learns us without waiting for the period), and every ``announce_interval_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from protocols import caps, topics
from protocols.envelope import Envelope, EnvelopeValidator
from protocols.identity import Identity
from protocols.mesh import Mesh, MeshConfig, create_mesh, envelope_validator

log = logging.getLogger("synord.mesh")


@dataclass
class PeerEntry:
    peer_id: str
    addrs: list[str] = field(default_factory=list)
    capabilities: dict | None = None
    offer: dict | None = None
    seq: int = -1
    last_seen: float = 0.0
    connected: bool = False

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
        self.expiry_s = 3 * announce_interval_s
        self.mesh = mesh or create_mesh(identity, MeshConfig(
            listen=list(listen), bootstrap=list(bootstrap or []), mdns=mdns, **mesh_options))
        self.validator = EnvelopeValidator()
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

    def notify_profile_changed(self) -> None:
        self._announce_now.set()

    # -- running ---------------------------------------------------------------
    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
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
            with trio.move_on_after(self.announce_interval_s):
                await self._announce_now.wait()
            self._announce_now = trio.Event()
            await trio.sleep(0.2)  # coalesce bursts of connections / profile changes

    async def announce(self) -> int:
        """Publish our caps envelope now; returns its seq."""
        profile = self.profile_provider() or {}
        offer = self.offer_provider() if self.offer_provider else (
            profile.get("offer") or profile.get("offerable") or {})
        env = caps.make_caps(self.identity, profile, offer, self.listen_addrs(), self._seq.next())
        await self.mesh.publish(topics.CAPS, env.encode())
        self.announced += 1
        return env.body["seq"]

    async def _receive_caps(self, channel) -> None:
        async for msg in channel:
            env: Envelope = msg.value
            if env is None or msg.origin == self.identity.peer_id:
                continue
            body = env.body
            if body["seq"] <= self._best_seq.get(msg.origin, -1):
                continue
            self._best_seq[msg.origin] = body["seq"]
            entry = self._peers.setdefault(msg.origin, PeerEntry(msg.origin))
            entry.capabilities = body["profile"]
            entry.offer = body["offer"]
            entry.seq = body["seq"]
            entry.addrs = [a for a in body["addrs"] if a.endswith("/p2p/" + msg.origin)] or entry.addrs
            entry.last_seen = time.time()
            if self.on_caps is not None:
                self.on_caps(msg.origin, env)

    async def _watch_connections(self, events) -> None:
        async for ev in events:
            if ev.kind == "connected":
                entry = self._peers.setdefault(ev.peer_id, PeerEntry(ev.peer_id))
                entry.connected = True
                entry.last_seen = time.time()
                if not entry.addrs:
                    entry.addrs = self.mesh.peer_addrs(ev.peer_id)
                self._announce_now.set()  # let the newcomer learn us now
            else:
                self._peers.pop(ev.peer_id, None)

    def _expire(self, now: float) -> None:
        for pid, entry in list(self._peers.items()):
            if not entry.connected and now - entry.last_seen > self.expiry_s:
                del self._peers[pid]
