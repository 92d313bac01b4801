"""The synord DHT: py-libp2p 0.8.1's Kademlia (``libp2p.kad_dht``) under our own
protocol id, with every record a peer gives us checked (rules: `synord.protocols.kad`).

The library ignores ``protocol_prefix`` on the wire: five of its modules read the
module-level ``PROTOCOL_ID`` (``/ipfs/kad/1.0.0``) when they open or serve a stream.
We rebind that name in each of them, once, at import (upstream-style: the same
constant, another value), so this process speaks ``/synord/kad/1.0.0`` only and
can never join IPFS's DHT nor answer it.  What else is ours:

- the DHT sees the host through `_DHTHost`: the addresses it advertises (in
  provider records and signed peer records, which anyone may read) are the
  broadcastable ones (`synord.protocols.addrs`: public and relay addresses, never
  ``/ip4/0.0.0.0``), and every address peers hand it for the peerstore is checked;
- an answer tells the asker only what it may be told about each peer (no private
  address learnt on another LAN), and carries no third party's signed record;
- find_peer stops at the first answer that names the target; find_providers asks
  the closest known peers first (the library's full walk is its fallback);
- provider records others store with us are checked and bounded
  (`_BoundedProviderStore`), and expire after ``RECORD_TTL_S``; we re-provide our
  keys every ``REPROVIDE_S`` (the library's own schedule is 22 h);
- inbound DHT streams count against the mesh's stream budget and live at most
  ``INBOUND_STREAM_S``; lookups run under ``LOOKUP_S``; refusals are counted;
- no value records (PUT_VALUE): the validator knows no namespace, so all are refused.
"""

from __future__ import annotations

import contextvars
import logging
import math
import random
from collections import OrderedDict

import multiaddr
import trio
from . import libp2p_loader  # noqa: F401  before any libp2p import (see there)
from libp2p.custom_types import TProtocol
from libp2p.kad_dht import common as _common, kad_dht as _kad_dht, peer_routing as _peer_routing
from libp2p.kad_dht import provider_store as _provider_store, value_store as _value_store
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.common import ALPHA, BUCKET_SIZE, QUERY_TIMEOUT
from libp2p.kad_dht.provider_store import ProviderStore
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.validator import NamespacedValidator
from libp2p.tools.anyio_service import background_trio_service

from . import addrs as addr_policy
from .kad import (INBOUND_STREAM_S, LOOKUP_S, MAX_PROVIDER_KEYS, PROTOCOL, RECORD_TTL_S, REPROVIDE_S,
                  sanitize_addrs)
from .refusals import REFUSALS
from .streamlimits import Refusal, StreamLimits, count as count_stream_refusal

log = logging.getLogger("synord.dht")

for _module in (_common, _kad_dht, _peer_routing, _provider_store, _value_store):
    _module.PROTOCOL_ID = TProtocol(PROTOCOL)
_provider_store.PROVIDER_RECORD_EXPIRATION_INTERVAL = RECORD_TTL_S

SEEN_MAX = 10_000  # peers whose last connection address we remember
# Where the peer whose DHT request we are answering connects from (None: unknown, e.g.
# relayed); unset (False) while we run our own lookups.  Set per inbound stream task.
_ASKER: contextvars.ContextVar = contextvars.ContextVar("synord_dht_asker", default=False)
IDENTIFY_WAIT_S = 30.0  # how long a new connection may take to tell us its protocols (a busy node)
REPROVIDE_RETRY_S = 5.0  # a provide that reached no one is retried, doubling up to REPROVIDE_S


def _refuse(reasons) -> None:
    for why in set(reasons):
        REFUSALS.count("dht", why)


class _CheckedPeerstore:
    """The peerstore as the DHT sees it: addresses learnt from DHT answers are
    checked before they are kept (and so before anything dials them)."""

    def __init__(self, peerstore):
        self._ps = peerstore

    def add_addrs(self, peer_id, addrs, ttl: int = 0) -> None:
        kept, refused = sanitize_addrs(addrs)
        _refuse(refused)
        if kept:
            self._ps.add_addrs(peer_id, [multiaddr.Multiaddr(a) for a in kept], ttl)

    def add_addr(self, peer_id, addr, ttl: int = 0) -> None:
        self.add_addrs(peer_id, [addr], ttl)

    def get_peer_record(self, peer_id):
        """None while answering a peer: a third party's signed record lists every address
        it has, private ones included, which the asker may not be told."""
        return None if _ASKER.get() is not False else self._ps.get_peer_record(peer_id)

    def __getattr__(self, name):
        return getattr(self._ps, name)


class _DHTHost:
    """The host as the DHT sees it: our advertised addresses, a checked peerstore."""

    def __init__(self, host, advertised):
        self._host = host
        self._advertised = advertised
        self._peerstore = _CheckedPeerstore(host.get_peerstore())

    def get_addrs(self) -> list[multiaddr.Multiaddr]:
        # what every peer may read (provider and signed peer records travel on): public and
        # relay addresses; a loopback test mesh's loopback ones.  The same texts as the
        # host's own: the signed peer record is cached by its address set
        kept, _ = sanitize_addrs(addr_policy.broadcastable(self._advertised()))
        return [multiaddr.Multiaddr(a) for a in kept]

    def get_peerstore(self):
        return self._peerstore

    def __getattr__(self, name):
        return getattr(self._host, name)


class _DeadlineStream:
    """An inbound DHT stream with the mesh's deadlines (synord.protocols.streamlimits):
    its first bytes within ``first_frame_s``, every later read within ``frame_s``, so a
    silent or stalled asker is reset like on our own protocols (the library waits)."""

    def __init__(self, stream, limits: StreamLimits):
        self._stream, self._limits = stream, limits
        self._reads = 0
        self.late: str | None = None  # the refusal, once a deadline fired

    async def read(self, n: int | None = None) -> bytes:
        first = self._reads == 0
        with trio.move_on_after(self._limits.first_frame_s if first else self._limits.frame_s) as scope:
            data = await self._stream.read(n)
        if scope.cancelled_caught:
            self.late = Refusal.FIRST_FRAME if first else Refusal.FRAME_BODY
            raise trio.TooSlowError
        self._reads += 1
        return data

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _BoundedProviderStore(ProviderStore):
    """Provider records others give us: checked addresses, bounded key count; in answers,
    only the addresses the asker may be told (synord.protocols.addrs)."""

    def __init__(self, *args, seen=None, **kw):
        super().__init__(*args, **kw)
        self._seen = seen or (lambda peer: None)

    def get_providers(self, key: bytes) -> list[PeerInfo]:
        found = super().get_providers(key)
        asker = _ASKER.get()
        if asker is False:  # our own lookup: we dial what we find (dials are guarded)
            return found
        out = []
        for info in found:
            told = addr_policy.tell_about([str(a) for a in info.addrs], asker,
                                          self._seen(info.peer_id.to_base58()))
            if told:
                out.append(PeerInfo(info.peer_id, [multiaddr.Multiaddr(a) for a in told]))
        return out

    def add_provider(self, key: bytes, provider: PeerInfo) -> None:
        if not provider or not provider.peer_id:
            return
        kept, refused = sanitize_addrs(provider.addrs)
        _refuse(refused)
        if not kept:
            REFUSALS.count("dht", "no-address")
            return
        if key not in self.providers and len(self.providers) >= MAX_PROVIDER_KEYS:
            REFUSALS.count("dht", "store-full")
            return
        super().add_provider(key, PeerInfo(provider.peer_id, [multiaddr.Multiaddr(a) for a in kept]))

    def _save(self) -> None:  # records live in memory: providers re-provide after our restart
        pass

    async def find_providers(self, key: bytes, count: int = 20) -> list[PeerInfo]:
        """GET_PROVIDERS to the closest peers we know, round after round towards the key,
        stopping at the first round that found any.  The library's walks the whole way to
        the key's k closest peers first (FIND_NODE rounds), then asks them: 2.3 s p50 at 30
        nodes (bench/bench_dht.py).  It is the fallback when ours finds nothing."""
        local = self.get_providers(key)
        if local:
            return local[:count]
        me = self.local_peer_id
        seeds = (self.peer_routing.routing_table.find_local_closest_peers(key, BUCKET_SIZE)
                 or list(self.host.get_connected_peers()))
        candidates, queried = sort_peer_ids_by_distance(key, seeds), {me}
        found: dict[str, PeerInfo] = {}
        while candidates and not found:
            batch, closer = [p for p in candidates[:ALPHA] if p not in queried], []
            queried.update(batch)

            async def ask(peer: ID) -> None:
                with trio.move_on_after(QUERY_TIMEOUT):
                    providers, more = await self._get_providers_from_peer_with_closers(peer, key)
                    closer.extend(more)
                    for info in providers:
                        kept, refused = sanitize_addrs(info.addrs)
                        _refuse(refused)
                        if kept and info.peer_id != me:
                            found[info.peer_id.to_base58()] = PeerInfo(
                                info.peer_id, [multiaddr.Multiaddr(a) for a in kept])

            async with trio.open_nursery() as nursery:
                for peer in batch:
                    nursery.start_soon(ask, peer)
            rest = [p for p in dict.fromkeys(candidates[ALPHA:] + closer) if p not in queried]
            candidates = sort_peer_ids_by_distance(key, rest)
        if not found:
            return await super().find_providers(key, count)
        return list(found.values())[:count]


class SynordDHT(KadDHT):
    """py-libp2p's KadDHT on ``/synord/kad/1.0.0`` (see the module doc).

    ``mode`` is "server" or "client"; ``advertised()`` lists our dialable addresses;
    ``budget`` (a `StreamBudget`) bounds inbound streams per peer and in total;
    ``limits`` gives inbound streams the mesh's first-frame and frame deadlines."""

    def __init__(self, host, mode: str, advertised, budget=None, seen_at=None,
                 limits: StreamLimits | None = None):
        view = _DHTHost(host, advertised)
        super().__init__(view, DHTMode.SERVER if mode == "server" else DHTMode.CLIENT,
                         enable_random_walk=False,
                         validator=NamespacedValidator({}, strict_validation=True),
                         validator_changed=True, strict_validation=True)
        self._seen_at = seen_at or (lambda peer: None)
        self._last_seen: OrderedDict[str, str] = OrderedDict()  # peer -> IP of its last connection
        self.provider_store = _BoundedProviderStore(host=view, peer_routing=self.peer_routing,
                                                    seen=self.seen)
        self._real_host = host
        self._budget = budget
        self._limits = limits or StreamLimits()
        self._provided: dict[bytes, float] = {}  # key -> when it is provided next
        self._retry: dict[bytes, float] = {}
        self._wake = trio.Event()
        self._joined = False
        self.lookups = {"find_peer": 0, "find_providers": 0, "provide": 0}

    def seen(self, peer_id: str) -> str | None:
        """Where ``peer_id`` connects (or last connected) from: what it may be told about."""
        ip = self._seen_at(peer_id)
        if ip is not None:
            self._last_seen[peer_id] = ip
            self._last_seen.move_to_end(peer_id)
            while len(self._last_seen) > SEEN_MAX:
                self._last_seen.popitem(last=False)
            return ip
        return self._last_seen.get(peer_id)

    @property
    def mode_name(self) -> str:
        return "server" if self.mode == DHTMode.SERVER else "client"

    # -- serving -------------------------------------------------------------
    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reprovide_loop)
                task_status.started()
                await trio.sleep_forever()

    async def handle_stream(self, stream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        if self.mode == DHTMode.CLIENT:
            REFUSALS.count("dht", "client-mode")
            return await self._reset(stream)
        if self._inbound_limiter.borrowed_tokens >= self._inbound_limiter.total_tokens:
            REFUSALS.count("dht", "busy")  # the library resets it
        if self._budget is not None and self._budget.open_stream(peer) is not None:
            return await self._reset(stream)  # counted by the budget
        _ASKER.set(self.seen(peer))  # this task's: the answers are filtered for it
        try:
            timed = _DeadlineStream(stream, self._limits)
            with trio.move_on_after(INBOUND_STREAM_S) as scope:
                try:
                    await super().handle_stream(timed)
                except trio.TooSlowError:
                    pass
            if timed.late is not None:  # silent from the start, or stalled mid-message
                count_stream_refusal(timed.late)
                await self._reset(stream)
            elif scope.cancelled_caught:
                REFUSALS.count("dht", "stream-deadline")
                await self._reset(stream)
        finally:
            if self._budget is not None:
                self._budget.close_stream(peer)

    @staticmethod
    async def _reset(stream) -> None:
        with trio.move_on_after(1):
            try:
                await stream.reset()
            except Exception:  # already gone
                pass

    def _add_closer_peers_to_response(self, response, closest_peers, exclude_peer_id=None) -> None:
        """As the library's, but handing out only addresses we would dial and the asker
        may be told (no private address learnt on another LAN, synord.protocols.addrs)."""
        super()._add_closer_peers_to_response(response, closest_peers, exclude_peer_id)
        asker = self.seen(exclude_peer_id.to_base58()) if exclude_peer_id is not None else None
        me = self.local_peer_id.to_base58()
        for peer in response.closerPeers:
            try:
                addrs = [multiaddr.Multiaddr(a) for a in peer.addrs]
                pid = ID(peer.id).to_base58()
            except Exception:
                addrs, pid = [], ""
            kept, _ = sanitize_addrs(addrs)
            kept = (addr_policy.tell(kept, asker) if pid == me
                    else addr_policy.tell_about(kept, asker, self.seen(pid)))
            if len(kept) != len(peer.addrs):
                peer.ClearField("signedRecord")  # it lists them all
            del peer.addrs[:]
            peer.addrs.extend(multiaddr.Multiaddr(a).to_bytes() for a in kept)

    async def peer_connected(self, peer_id: str) -> None:
        """A new connection: once identify says it serves the synord DHT, it joins our
        routing table (the library checks the protocol; peers of IPFS's DHT never do)."""
        pid, added = ID.from_base58(peer_id), False
        self.seen(peer_id)  # remembered for answers about it after it disconnects
        with trio.move_on_after(IDENTIFY_WAIT_S):
            wait = 0.05
            while not self._protocols(pid):
                await trio.sleep(wait)
                wait = min(2 * wait, 1.0)
            try:
                added = await self.add_peer(pid)
            except Exception as exc:  # a peer gone meanwhile
                log.debug("dht add_peer %s: %s", peer_id[:16], exc)
                return
        if added and not self._joined:
            # Kademlia's join: look ourselves up, so that the peers closest to us learn
            # of us and we of them (the library refreshes only every 10 minutes)
            self._joined = True
            with trio.move_on_after(LOOKUP_S):
                await self.peer_routing.find_closest_peers_network(self.local_peer_id.to_bytes())

    async def add_peer(self, peer_id: ID, *, skip_server_mode_check: bool = False) -> bool:
        """The library takes "it opened a DHT stream to us" for proof of server mode,
        but clients query too: only a peer that identify says serves our DHT joins."""
        if PROTOCOL not in self._protocols(peer_id):
            return False
        return await self.routing_table.add_peer(peer_id)

    def _known_addrs(self, pid: ID) -> list:
        try:
            return self._real_host.get_peerstore().addrs(pid)
        except Exception:  # not in the peerstore
            return []

    def _protocols(self, pid: ID) -> list[str]:
        try:
            return self._real_host.get_peerstore().get_protocols(pid) or []
        except Exception:  # not in the peerstore (yet, or any more)
            return []

    # -- lookups ---------------------------------------------------------------
    async def find_peer_addrs(self, peer_id: str) -> list[str]:
        """``peer_id``'s current addresses as the network knows them (not our
        peerstore's, which may be stale: the peer may have moved)."""
        pid = ID.from_base58(peer_id)
        self.lookups["find_peer"] += 1
        if not self._real_host.get_network().get_connections(pid):
            self._real_host.get_peerstore().clear_addrs(pid)  # they failed us: learn them anew
        with trio.move_on_after(LOOKUP_S):
            async with trio.open_nursery() as nursery:
                async def lookup() -> None:
                    await self.peer_routing.find_closest_peers_network(pid.to_bytes())
                    nursery.cancel_scope.cancel()
                nursery.start_soon(lookup)
                # the lookup walks on to the closest peers; we are done once one answer
                # named the target with an address
                while not self._known_addrs(pid):
                    await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
        kept, _ = sanitize_addrs(self._known_addrs(pid))
        if kept:  # new addresses: the swarm's "recently failed all addresses" no longer holds
            try:
                self._real_host.get_network().unblock_peer(pid)
            except Exception:  # a swarm without the negative cache
                pass
        return [a if "/p2p/" in a else f"{a}/p2p/{peer_id}" for a in kept]

    async def find_providers_of(self, key: bytes, count: int = 20) -> list[tuple[str, list[str]]]:
        """[(peer id, dialable addresses)] of the providers of ``key``, ourselves excluded."""
        self.lookups["find_providers"] += 1
        found: list[PeerInfo] = []
        with trio.move_on_after(LOOKUP_S):
            found = await self.provider_store.find_providers(key, count)
        out: dict[str, list[str]] = {}
        for info in found:
            peer = info.peer_id.to_base58()
            if peer == self.local_peer_id.to_base58() or peer in out:
                continue
            kept, _ = sanitize_addrs(info.addrs)
            if kept:
                out[peer] = [a if "/p2p/" in a else f"{a}/p2p/{peer}" for a in kept]
        return list(out.items())

    def provide_key(self, key: bytes) -> None:
        """Announce ``key`` now and every REPROVIDE_S while we keep it."""
        if key not in self._provided:
            self._provided[key] = -math.inf
            self._wake.set()

    def unprovide_key(self, key: bytes) -> None:
        """Stop re-announcing ``key``; records others hold expire within RECORD_TTL_S."""
        self._provided.pop(key, None)
        self._retry.pop(key, None)
        self.provider_store.providing_keys.discard(key)

    async def _reprovide_loop(self) -> None:
        while True:
            now = trio.current_time()
            for key in [k for k, due in self._provided.items() if due <= now]:
                self.lookups["provide"] += 1
                ok = False
                with trio.move_on_after(2 * LOOKUP_S):
                    try:
                        ok = await self.provider_store.provide(key)
                    except Exception as exc:  # no peers yet, a peer gone mid-way
                        log.debug("provide failed: %s", exc)
                if key not in self._provided:
                    continue  # unprovided meanwhile
                if ok:
                    self._retry.pop(key, None)
                    delay = REPROVIDE_S * random.uniform(0.9, 1.0)
                else:
                    delay = self._retry[key] = min(2 * self._retry.get(key, REPROVIDE_RETRY_S / 2), REPROVIDE_S)
                self._provided[key] = trio.current_time() + delay
            self._wake = trio.Event()
            wait = min(self._provided.values(), default=math.inf) - trio.current_time()
            with trio.move_on_after(max(wait, 0.05)):
                await self._wake.wait()

    def info_json(self) -> dict:
        return {"mode": self.mode_name, "protocol": PROTOCOL,
                "routing_table": self.routing_table.size(),
                "provider_keys": len(self.provider_store.providers),
                "providing": len(self._provided), "lookups": dict(self.lookups)}
