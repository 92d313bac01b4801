"""Circuit relay v2 (hop and client) and DCUtR hole punching on a daemon's libp2p host.

The I/O side of `synord.protocols.relayclient`: this module offers a relay hop
when the node is publicly reachable (or ``[relay] hop = "on"``), keeps
reservations on relays while it is not (``[relay] enabled``), dials peers
through a relay when they have no direct route, runs DCUtR so that two NATed
peers that met through a relay end up directly connected, and re-dials through
the relay when a hole punch dropped the relayed connection too (both sides
punching at once, see shared/notes/py-libp2p.md).

It plugs into `synord.protocols.p2p.Libp2pMesh` through ``mesh.circuit``
(``dial``, ``own_addrs``).  The DHT can publish `RelayService.own_addrs`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import multiaddr
import trio
from synord.protocols import libp2p_loader  # noqa: F401  before any libp2p import (see there)
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2 import dcutr as _dcutr_mod
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from synord.protocols import addrs as addr_policy
from synord.protocols.p2p import PEERSTORE_TTL_S
from synord.protocols.refusals import REFUSALS
from synord.protocols.relayclient import RelayClientMachine, circuit_addrs, is_circuit, split_circuit

log = logging.getLogger("synord.relay")

MODES = ("auto", "on", "off")
SCAN_S = 10.0           # look for new relays / reachability changes this often (new
                        # connections trigger a look at once: this only bounds idle wake-ups)
REDIAL_WINDOW_S = 30.0  # a relayed peer lost this soon after a punch began is re-dialled
DIAL_TIMEOUT_S = 10.0
DIAL_ROUNDS = 2


@dataclass
class RelaySettings:
    """The [relay] section of config.toml."""
    enabled: str = "auto"       # keep reservations: auto = while not publicly reachable
    hop: str = "auto"           # serve as a relay: auto = while publicly reachable
    reservations: int = 2       # relays a private node keeps a reservation on
    max_reservations: int = 128
    max_circuits: int = 256
    circuit_bytes: int = 64 << 20
    circuit_duration_s: int = 3600
    reservation_ttl_s: int = 3600
    transfer_max_bytes: int = 1 << 20   # larger transfers wait for a direct connection ...
    direct_wait_s: float = 15.0         # ... this long, then fail with the reason

    @classmethod
    def from_config(cls, section: dict) -> "RelaySettings":
        return cls(**section)


def _public(addr) -> bool:
    """Worth dialling for a hole punch: a public address (never 0.0.0.0, loopback, or a
    private one, which behind another NAT means some other machine, or ourselves)."""
    text = str(addr)
    return not is_circuit(text) and addr_policy.scope(text) == addr_policy.PUBLIC


def _bound_listen_addrs(host) -> list[tuple[int, str, int]]:
    """What the sockets are bound to (0.0.0.0:4001), not what we advertise: the library
    binds hole-punch dials to the first advertised address, which once wildcards are
    expanded (synord.protocols.p2p) is 127.0.0.1, and a SYN from there never leaves."""
    out = []
    for addr in host.get_transport_addrs():
        parsed = None if is_circuit(str(addr)) else _dcutr_mod._tcp_ip_port(addr)
        if parsed is not None:
            out.append(parsed)
    return out


_dcutr_mod._local_tcp_listen_addrs = _bound_listen_addrs


class _DCUtR(DCUtRProtocol):
    """DCUtR that dials only public addresses: the library dials every address in the
    peerstore (identify lists the peer's LAN and 0.0.0.0 listen addresses), and the
    peer's CONNECT message may carry any address at all."""

    async def _dial_peer(self, peer_id: ID, addr, *args, **kwargs) -> None:
        # every punch dial passes here; the library adds all peerstore addresses
        # (identify's LAN and 0.0.0.0 listen addresses) to the peer's own
        if _public(addr):
            await super()._dial_peer(peer_id, addr, *args, **kwargs)

    def _decode_observed_addrs(self, addr_bytes: list[bytes]) -> list[multiaddr.Multiaddr]:
        addrs = super()._decode_observed_addrs(addr_bytes)
        kept = [a for a in addrs if _public(a)]
        if len(kept) < len(addrs):
            REFUSALS.count("dcutr", "non-public-addr", len(addrs) - len(kept))
        return kept


class RelayService:
    def __init__(self, mesh, settings: RelaySettings | None = None,
                 reachability: Callable[[], str] | None = None):
        self.mesh = mesh
        self.host = mesh.host
        self.settings = s = settings or RelaySettings()
        # public / private / unknown: AutoNAT's verdict (synord.protocols.reachability)
        self.reachability = reachability or (lambda: mesh.reachability.status(time.time()))
        limits = RelayLimits(duration=s.circuit_duration_s, data=s.circuit_bytes,
                             max_circuit_conns=s.max_circuits, max_reservations=s.max_reservations,
                             reservation_ttl=s.reservation_ttl_s)
        self.protocol = CircuitV2Protocol(self.host, limits=limits, allow_hop=False)
        # STOP only: the library's client role makes a reservation before every dial
        self.transport = CircuitV2Transport(self.host, self.protocol, RelayConfig(
            roles=RelayRole.STOP, limits=limits))
        self.dcutr = _DCUtR(self.host, dial_timeout=5)
        self.machine = RelayClientMachine(want=s.reservations)
        self.hop_serving = False
        self._relayed: dict[str, float] = {}   # peer -> when we last got a relayed connection to it
        self._redialing: set[str] = set()
        self._redialed_at: dict[str, float] = {}  # peer -> when we last re-dialled it
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.punches = {"started": 0, "direct": 0, "redialled": 0}
        mesh.circuit = self

    # -- what the rest of the daemon asks ----------------------------------------
    def client_active(self) -> bool:
        mode = self.settings.enabled
        return mode == "on" or (mode == "auto" and self.reachability() != "public")

    def hop_wanted(self) -> bool:
        mode = self.settings.hop
        return mode == "on" or (mode == "auto" and self.reachability() == "public")

    def reachability_changed(self) -> None:
        """Re-decide hop and reservations now rather than at the next scan."""
        self._wake.set()

    def own_addrs(self) -> list[str]:
        """Our /p2p-circuit addresses through the relays holding a reservation for us
        (for capabilities, peer exchange and the DHT)."""
        out: list[str] = []
        me = self.mesh.peer_id
        for relay in self.machine.held(trio.current_time()):
            out.extend(circuit_addrs(relay, self._relay_addrs(relay), me)[:2])
        return out

    def relays_json(self) -> list[dict]:
        """For status: relay.relays (each relay, its reservation, our circuit addresses)."""
        now = trio.current_time()
        return [dict(r, addrs=circuit_addrs(r["peer_id"], self._relay_addrs(r["peer_id"]), self.mesh.peer_id)[:2])
                for r in self.machine.to_json(now)]

    def status_json(self) -> dict:
        return {"hop": self.hop_serving, "client": self.client_active(), "relays": self.relays_json(),
                "hole_punches": dict(self.punches),
                # connected peers we reach only through a relay (no hole punched, or not yet)
                "relayed_peers": sorted(p for p in self.mesh.connected_peers() if self.mesh.relayed_only(p))}

    # -- running -------------------------------------------------------------------
    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.protocol), background_trio_service(self.dcutr):
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                events = self.mesh.events()
                nursery.start_soon(self._watch_events, events)
                task_status.started()
                try:
                    await self._loop()
                finally:
                    self.mesh.circuit = None
                    self._nursery = None

    async def _loop(self) -> None:
        while True:
            self._set_hop(self.hop_wanted())
            now = trio.current_time()
            # relays are known also to a public node: it dials NATed peers through them
            self._scan_relays(now)
            if self.client_active():
                for relay in self.machine.due(now):
                    self.machine.started(relay)
                    self._nursery.start_soon(self._reserve, relay)
            self.mesh.set_relays(self.own_addrs())  # status: reachability.relays
            wake = min(now + SCAN_S, self.machine.next_wakeup(now))
            with trio.move_on_at(wake):
                await self._wake.wait()
            self._wake = trio.Event()

    def _set_hop(self, on: bool) -> None:
        if on == self.hop_serving:
            return
        self.hop_serving = self.protocol.allow_hop = on
        if on:
            self.host.set_stream_handler(HOP_ID, self.protocol._handle_hop_stream)
        else:
            self.host.remove_stream_handler(HOP_ID)
        log.info("circuit relay hop %s", "offered" if on else "withdrawn")

    def _scan_relays(self, now: float) -> None:
        """Directly connected peers that speak the hop protocol are relay candidates."""
        store = self.host.get_peerstore()
        for pid in self.host.get_connected_peers():
            peer = pid.to_base58()
            if self.mesh.relayed_only(peer):
                continue
            try:
                protocols = store.get_protocols(pid)
            except Exception:
                continue
            if str(HOP_ID) in [str(p) for p in protocols]:
                self.machine.candidate(peer, now)

    async def _reserve(self, relay: str) -> None:
        rid = ID.from_base58(relay)
        ok = False
        try:
            with trio.fail_after(DIAL_TIMEOUT_S):
                stream = await self.host.new_stream(rid, [HOP_ID])
                try:
                    ok = await self.transport._make_reservation(stream, rid)
                finally:
                    with trio.move_on_after(1):
                        await stream.close()
        except Exception as exc:
            log.info("reservation on relay %s failed: %s: %s", relay[:16], type(exc).__name__, exc)
        now = trio.current_time()
        expires = self.transport._reservations.get(rid, 0) if ok else 0
        if ok and expires:
            self.machine.reserved(relay, now + (expires - time.time()), now)
            log.info("reservation on relay %s for %.0f s", relay[:16], expires - time.time())
        else:
            self.machine.failed(relay, now)
        self._wake.set()

    def _relay_addrs(self, relay: str) -> list[str]:
        """Where others reach ``relay``: its advertised addresses, else the address our
        own connection to it goes to (a relay listening on 0.0.0.0 may advertise only that)."""
        addrs = _direct(self.mesh.peer_addrs(relay))
        if addrs:
            return addrs
        try:
            conns = self.host.get_network().get_connections(ID.from_base58(relay))
            return _direct([str(a) for c in conns for a in c.get_transport_addresses()])
        except Exception:
            return []

    # -- dialling through relays ------------------------------------------------
    def _candidate_circuits(self, peer: str, addrs: list[str]) -> list[str]:
        """The circuit addresses we were given for ``peer``, then one through each relay
        we are directly connected to (NATed nodes reserve on the same public anchors)."""
        out = [a for a in addrs if is_circuit(a) and (split_circuit(a) or ("", ""))[1] == peer]
        seen = {split_circuit(a)[0] for a in out}
        relays = self.machine.held(trio.current_time()) + [
            r["peer_id"] for r in self.machine.to_json(trio.current_time()) if r["connected"]]
        for relay in dict.fromkeys(relays):
            if relay not in seen and relay != peer:
                out.extend(circuit_addrs(relay, self._relay_addrs(relay), peer)[:1]
                           or [f"/p2p/{relay}/p2p-circuit/p2p/{peer}"])  # we are connected to it
                seen.add(relay)
        return out

    async def dial(self, peer: str, addrs: list[str]) -> bool:
        """Connect to ``peer`` through a relay; True once connected (by any route).
        Two rounds over the candidates: a relay that just restarted, or a peer
        re-making its reservation there, refuses for a moment."""
        for attempt in range(DIAL_ROUNDS):
            if attempt:
                await trio.sleep(0.5)
            if await self._dial_once(peer, addrs):
                return True
        return False

    async def _dial_once(self, peer: str, addrs: list[str]) -> bool:
        pid = ID.from_base58(peer)
        for addr in self._candidate_circuits(peer, addrs):
            if self.host.get_network().get_connections(pid):
                return True
            try:
                with trio.fail_after(DIAL_TIMEOUT_S):
                    await self.transport.dial(multiaddr.Multiaddr(addr))
            except Exception as exc:
                log.debug("relayed dial %s via %s: %s", peer[:16], addr, exc)
                continue
            finally:
                self._drop_bare_addrs(split_circuit(addr))
            log.info("connected to %s through relay %s", peer[:16], split_circuit(addr)[0][:16])
            now = self._relayed[peer] = trio.current_time()
            if self._nursery is not None:
                self._nursery.start_soon(self._watch_punch, peer, now)
                self._nursery.start_soon(self._punch, pid)
            return True
        return bool(self.host.get_network().get_connections(pid))

    async def _punch(self, pid: ID) -> None:
        """The dialling side starts the hole punch at once (the library's own loop would
        wait up to 2 s); the answering side's loop finds the punch already under way."""
        self.punches["started"] += 1
        try:
            with trio.move_on_after(30):
                if await self.dcutr.initiate_hole_punch(pid):
                    self.punches["direct"] += 1
        except Exception as exc:
            log.debug("hole punch %s: %s", pid, exc)

    async def _watch_events(self, events) -> None:
        async for ev in events:
            now = trio.current_time()
            if ev.kind == "connected":
                if self.mesh.relayed_only(ev.peer_id):
                    self._relayed[ev.peer_id] = now
                    self._nursery.start_soon(self._watch_punch, ev.peer_id, now)
                else:
                    self._nursery.start_soon(self._rescan_soon)  # a relay, once identify told us
                continue
            self.machine.lost(ev.peer_id, now)
            self._wake.set()
            since = self._relayed.pop(ev.peer_id, None)
            last = self._redialed_at.get(ev.peer_id, -REDIAL_WINDOW_S)
            # at most one re-dial per peer and window: a connection that keeps dropping
            # (a peer leaving, both sides re-dialling) must not become a dial loop
            if since is not None and now - since < REDIAL_WINDOW_S and now - last >= REDIAL_WINDOW_S \
                    and ev.peer_id not in self._redialing:
                self._redialed_at = {p: t for p, t in self._redialed_at.items() if now - t < REDIAL_WINDOW_S}
                self._redialed_at[ev.peer_id] = now
                self._nursery.start_soon(self._redial, ev.peer_id)

    def _drop_bare_addrs(self, ids) -> None:
        """The library's relayed dial files the relay under the circuit address's relay
        part, a bare /p2p/<id> with no transport: the swarm then prefers it to the relay's
        loopback address and cannot dial the relay at all (its own dial skips neither)."""
        store = self.host.get_peerstore()
        for peer in ids or ():
            try:
                pid = ID.from_base58(peer)
                addrs = store.addrs(pid)
            except Exception:
                continue
            kept = [a for a in addrs if is_circuit(str(a)) or not str(a).startswith("/p2p/")]
            if len(kept) < len(addrs):
                store.clear_addrs(pid)
                store.add_addrs(pid, kept, PEERSTORE_TTL_S)

    def _prune_lan_addrs(self, peer: str) -> None:
        """A peer we reach through a relay is not on our LAN: its private and loopback
        addresses (learnt from signed peer records the relay passes on) would have us
        dial some other machine, or ourselves, and be handed on as its addresses."""
        store, pid = self.host.get_peerstore(), ID.from_base58(peer)
        try:
            addrs = store.addrs(pid)
        except Exception:
            return
        kept = [a for a in addrs if is_circuit(str(a)) or addr_policy.scope(str(a)) in (
            addr_policy.PUBLIC, addr_policy.OTHER)]
        if len(kept) < len(addrs):
            store.clear_addrs(pid)
            store.add_addrs(pid, kept, PEERSTORE_TTL_S)

    async def _watch_punch(self, peer: str, since: float) -> None:
        """Once a relayed peer is also directly connected, the punch is over: a later
        disconnect is a real one (or the other side's choice) and is not re-dialled."""
        with trio.move_on_after(REDIAL_WINDOW_S):
            while self._relayed.get(peer) == since:
                self._prune_lan_addrs(peer)
                if peer in self.mesh.connected_peers() and not self.mesh.relayed_only(peer):
                    self._relayed.pop(peer, None)
                    return
                await trio.sleep(0.25)

    def dropping(self, peer: str) -> None:
        """We are about to disconnect ``peer`` on purpose: do not re-dial it."""
        self._relayed.pop(peer, None)

    async def _rescan_soon(self) -> None:
        for delay in (0.2, 0.8):
            await trio.sleep(delay)
            self._wake.set()

    async def _redial(self, peer: str) -> None:
        """A peer we reached through a relay vanished while a punch may have been under
        way: the punch can drop the relayed connection too. Re-dial through the relay
        (bounded); a peer that really left refuses at its relay (no reservation)."""
        self._redialing.add(peer)
        try:
            await trio.sleep(0.2)
            if await self.dial(peer, []):
                self.punches["redialled"] += 1
                log.info("re-dialled %s through the relay after its connection dropped", peer[:16])
        finally:
            self._redialing.discard(peer)


def _direct(addrs: list[str]) -> list[str]:
    """A relay's addresses worth putting in a circuit address others dial: not a circuit,
    not 0.0.0.0, and loopback only for a relay on loopback alone (a local test mesh):
    a peer elsewhere would dial itself."""
    out = [a for a in addrs if not is_circuit(a) and addr_policy.dialable(a)]
    beyond = [a for a in out if addr_policy.scope(a) != addr_policy.LOOPBACK]
    return beyond or out

