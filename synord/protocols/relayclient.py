"""Which circuit relays a private node keeps reservations on, and when it renews them.

Sans-IO: the driver (`synord.relay`) feeds it what happened (a relay-capable
peer connected, a reservation was granted or refused, a relay went away) with
the current time, and asks ``due(now)`` which relays to (re)reserve now and
``next_wakeup(now)`` when to ask again.  It never touches a socket.

Why not the library's RelayDiscovery: it reserves once at start and then every
300 s, so a node that meets its relays after starting (the usual case) has no
reservation for minutes and every relayed dial to it fails with NO_RESERVATION.

Rules:
- keep ``want`` reservations (2: one relay restarting must not make us unreachable);
- renew a reservation at ``renew_at`` of its lifetime (half by default), well before it expires;
- a relay that refused or failed is retried after a back-off that doubles per failure;
- a relay that disconnects loses its reservation (it may have restarted and forgotten
  it); when it comes back it is a candidate again and gets a fresh one;
- among candidates, ones that never failed first, then by the order they came.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import trio

from .mesh import Mesh, MeshError
from .refusals import REFUSALS

CIRCUIT = "/p2p-circuit"


@dataclass
class _Relay:
    peer_id: str
    order: int
    connected: bool = True
    expires_at: float | None = None   # when the reservation we hold ends (None: none held)
    granted_at: float = 0.0
    failures: int = 0
    retry_at: float = 0.0             # no attempt before this
    in_flight: bool = False


class RelayClientMachine:
    def __init__(self, want: int = 2, renew_at: float = 0.5, backoff_min_s: float = 2.0,
                 backoff_max_s: float = 120.0, min_lifetime_s: float = 10.0):
        if want < 1 or not 0 < renew_at < 1:
            raise ValueError("want must be >= 1 and renew_at in (0, 1)")
        self.want = want
        self.renew_at = renew_at
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.min_lifetime_s = min_lifetime_s  # a relay granting less is treated as a refusal
        self._relays: dict[str, _Relay] = {}
        self._order = 0

    # -- events --------------------------------------------------------------
    def candidate(self, peer_id: str, now: float) -> None:
        """A connected peer that serves the circuit relay hop protocol."""
        relay = self._relays.get(peer_id)
        if relay is None:
            self._order += 1
            self._relays[peer_id] = _Relay(peer_id, self._order)
        elif not relay.connected:
            relay.connected = True
            relay.expires_at = None  # a relay that was away may have restarted: reserve afresh
            relay.retry_at = min(relay.retry_at, now)

    def lost(self, peer_id: str, now: float) -> None:
        """The connection to a relay is gone: whatever it held for us is not to be trusted."""
        relay = self._relays.get(peer_id)
        if relay is not None:
            relay.connected = False
            relay.expires_at = None
            relay.in_flight = False

    def forget(self, peer_id: str) -> None:
        """Not a relay (any more): it stopped serving the hop protocol."""
        self._relays.pop(peer_id, None)

    def started(self, peer_id: str) -> None:
        if peer_id in self._relays:
            self._relays[peer_id].in_flight = True

    def reserved(self, peer_id: str, expires_at: float, now: float) -> None:
        relay = self._relays.get(peer_id)
        if relay is None:
            return
        relay.in_flight = False
        if expires_at - now < self.min_lifetime_s:
            self.failed(peer_id, now)
            return
        relay.expires_at, relay.granted_at = expires_at, now
        relay.failures, relay.retry_at = 0, 0.0

    def failed(self, peer_id: str, now: float) -> None:
        relay = self._relays.get(peer_id)
        if relay is None:
            return
        relay.in_flight = False
        relay.failures += 1
        relay.retry_at = now + min(self.backoff_min_s * 2 ** (relay.failures - 1), self.backoff_max_s)
        if relay.expires_at is not None and relay.expires_at <= now:
            relay.expires_at = None

    # -- questions -----------------------------------------------------------
    def held(self, now: float) -> list[str]:
        """Relays whose reservation for us is valid now."""
        return [r.peer_id for r in self._sorted() if r.connected and r.expires_at is not None
                and r.expires_at > now]

    def expires_at(self, peer_id: str) -> float | None:
        relay = self._relays.get(peer_id)
        return relay.expires_at if relay is not None else None

    def _renew_time(self, r: _Relay) -> float:
        assert r.expires_at is not None
        return r.granted_at + (r.expires_at - r.granted_at) * self.renew_at

    def due(self, now: float) -> list[str]:
        """Relays to send a RESERVE to now (marks nothing: call ``started``)."""
        out: list[str] = []
        held = 0
        for r in self._sorted():
            if not r.connected or r.in_flight:
                held += bool(r.in_flight and r.connected)
                continue
            if r.expires_at is not None and r.expires_at > now:
                held += 1
                if now >= max(self._renew_time(r), r.retry_at):
                    out.append(r.peer_id)
        for r in self._sorted():
            if held >= self.want:
                break
            if r.connected and not r.in_flight and (r.expires_at is None or r.expires_at <= now) \
                    and now >= r.retry_at:
                out.append(r.peer_id)
                held += 1
        return out

    def next_wakeup(self, now: float) -> float:
        """The earliest time ``due`` may answer differently without a new event."""
        times = []
        held = len(self.held(now))
        for r in self._relays.values():
            if not r.connected or r.in_flight:
                continue
            if r.expires_at is not None and r.expires_at > now:
                times.append(max(self._renew_time(r), r.retry_at))
                times.append(r.expires_at)
            elif held < self.want:
                times.append(r.retry_at)
        return max(now, min(times)) if times else math.inf

    def _sorted(self) -> list[_Relay]:
        return sorted(self._relays.values(), key=lambda r: (r.failures > 0, r.order))

    def to_json(self, now: float) -> list[dict]:
        return [{"peer_id": r.peer_id, "connected": r.connected,
                 "reserved": r.expires_at is not None and r.expires_at > now,
                 "expires_in_s": round(r.expires_at - now, 1) if r.expires_at is not None else None,
                 "failures": r.failures} for r in self._sorted()]


# -- addresses -------------------------------------------------------------------
def is_circuit(addr: str) -> bool:
    return CIRCUIT in addr


def circuit_addrs(relay_id: str, relay_addrs: list[str], self_id: str) -> list[str]:
    """Our addresses through ``relay_id``: /<relay transport addr>/p2p/<relay>/p2p-circuit/p2p/<us>.
    Relay addresses that are themselves circuits are skipped (no relay chains)."""
    out = []
    for addr in relay_addrs:
        if is_circuit(addr) or "/ip4/0.0.0.0/" in addr:
            continue
        base = addr if addr.endswith(f"/p2p/{relay_id}") else f"{addr}/p2p/{relay_id}"
        out.append(f"{base}{CIRCUIT}/p2p/{self_id}")
    return out


def split_circuit(addr: str) -> tuple[str, str] | None:
    """``(relay_id, target_id)`` of a circuit multiaddr, or None if it is not one."""
    head, sep, tail = addr.partition(CIRCUIT)
    if not sep:
        return None
    relay = head.rsplit("/p2p/", 1)
    target = tail.rsplit("/p2p/", 1)
    if len(relay) != 2 or len(target) != 2 or not relay[1] or not target[1] or "/" in relay[1]:
        return None
    return relay[1], target[1]


# -- bulk transfers ----------------------------------------------------------------
def relay_transfer_refusal(peer_id: str, size: int, relay_max_bytes: int) -> str | None:
    """Why a transfer of ``size`` bytes to a peer we reach only through a relay may not
    run (relays are limited: circuits carry signalling and small messages, not
    artefacts or checkpoints), or None when it is small enough."""
    if size <= relay_max_bytes:
        return None
    return (f"peer {peer_id[:16]} only reachable through a limited relay; "
            f"transfer of {size / (1 << 20):.1f} MiB refused")


RELAY_TRANSFER_MAX_BYTES = 1 << 20  # what a limited relay may carry of one transfer
DIRECT_WAIT_S = 15.0                # how long a larger one waits for the hole punch


async def wait_direct(mesh: Mesh, peer_id: str, size: int) -> None:
    """Before sending ``size`` bytes to ``peer_id``: while we reach it only through a relay,
    wait (bounded) for the direct connection hole punching makes; raise MeshError with
    the reason if it does not come.  The limits come from the mesh's relay service
    (``mesh.circuit.settings``) when it has one."""
    settings = getattr(getattr(mesh, "circuit", None), "settings", None)
    max_bytes = getattr(settings, "transfer_max_bytes", RELAY_TRANSFER_MAX_BYTES)
    if relay_transfer_refusal(peer_id, size, max_bytes) is None or not mesh.relayed_only(peer_id):
        return
    with trio.move_on_after(getattr(settings, "direct_wait_s", DIRECT_WAIT_S)):
        while mesh.relayed_only(peer_id):
            await trio.sleep(0.25)
    if mesh.relayed_only(peer_id):
        REFUSALS.count("transfer", "relay-limited")
        raise MeshError(relay_transfer_refusal(peer_id, size, max_bytes))
