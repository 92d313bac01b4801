"""The py-libp2p (0.8.1) implementation of `synord.protocols.mesh.Mesh`.

Every setting here comes from measurements in shared/notes/py-libp2p.md:
- Noise is the only security transport (the library default also offers
  TLS, secio and *plaintext*); yamux the only muxer;
- ``max_connections_per_peer=1`` removes a 250 ms staggered-dial stall;
- health pings drop a frozen (SIGSTOPped) peer; auto-dialling is off (the
  library would keep redialling dead peers), we dial ourselves, bounded;
- GossipSub v1.1 with spam protection / adaptive gossip / eclipse checks off
  (they silently drop most messages); rate limits live in our validators;
  mesh degree 4/3/8 and no signed peer record on message RPCs: on 2 cores
  reach-all latency is bound by total CPU per message (duplicates included),
  N=30 p50 65 -> 53 ms (bench/bench_gossip.py);
- pubsub and router services start before ``host.run``;
- subscriptions are drained promptly into our own channels;
- TCP is read in 256 KiB gulps and yamux frames fit one Noise message
  (bench/bench_transfer.py: CPU per MiB received 12.7 -> 9.6 ms);
- Noise sessions and yamux connections take our lean data paths
  (p2p_noise, p2p_yamux: same wire format, less Python per frame).
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import time
from collections import OrderedDict

# Yamux sends ~3 window updates per data frame otherwise (~20% CPU). Read at call time.
os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")

from .libp2p_loader import new_host  # first: py-libp2p without the features we do not use

import msgpack
import multiaddr
import trio
from libp2p.abc import INotifee
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.network.config import ConnectionConfig
from libp2p.host.ping import ID as PING_ID, PING_LENGTH
from libp2p.io.utils import read_exactly
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIP_V10, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.io.trio import TrioTCPStream
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH as NOISE_MAX_PLAINTEXT
from libp2p.stream_muxer import muxer_multistream as _libp2p_muxer_multistream
from libp2p.stream_muxer.yamux import yamux as _libp2p_yamux
from libp2p.tools.anyio_service import background_trio_service
from libp2p.transport.tcp import tcp as _libp2p_tcp

from . import addrs as addr_policy
from .dht import DHTMode, SynordDHT
from .framing import FramedStream, StreamLimitError
from .identity import Identity
from .kad import choose_mode
from .mesh import (PX_MAX_PEERS, PX_PROTOCOL, GossipMessage, Mesh, MeshConfig, MeshError, PeerEvent,
                   StreamHandler, Validator, parse_px_reply)
from .p2p_noise import LeanNoiseTransport
from .p2p_yamux import LeanYamux
from .reachability import Reachability
from .refusals import REFUSALS
from .streamlimits import StreamBudget, StreamGuard

log = logging.getLogger("synord.mesh")

PEERSTORE_TTL_S = 3600
PING_IDLE_S = 10.0  # an inbound ping stream silent this long is closed (as the library does)
MOVED_LOOKUP_S = 8.0  # a stream to a peer not at its known addresses: DHT lookup + dial, at most
PX_MAX_STRETCH = 16  # a settled node's periodic peer exchange: every px_interval_s x this at most

_listen_errors: dict[int, str] = {}  # port -> why binding it failed last


_reuseport_listeners = _libp2p_tcp._open_reuseport_listeners


async def _exclusive_listeners(host: str | None, port: int) -> list[trio.SocketListener]:
    """py-libp2p listens with SO_REUSEPORT so that DCUtR hole punching can dial
    *from* the listen port; but then a second daemon on the same port silently
    shares it.  Bind the port the way trio does (SO_REUSEADDR only) first: that
    fails if anyone listens there; then listen with SO_REUSEPORT on that port
    (the one the kernel chose, for port 0). Keep the reason a bind failed."""
    try:
        probe = await trio.open_tcp_listeners(port, host=host)
        port = probe[0].socket.getsockname()[1]
        for listener in probe:
            listener.socket.close()
        return await _reuseport_listeners(host, port)
    except (OSError, _libp2p_tcp.OpenConnectionError) as exc:
        errno = getattr(exc, "errno", None)
        _listen_errors[port] = (os.strerror(errno) if errno else str(exc)).lower()
        raise _libp2p_tcp.OpenConnectionError(f"cannot listen on {host}:{port}: {exc}") from exc


_libp2p_tcp._open_reuseport_listeners = _exclusive_listeners
# Its listen() also logs each failure as a bare line of its own; `_check_listening` says it once.
logging.getLogger(_libp2p_tcp.__name__).setLevel(logging.CRITICAL)


class _BufferedTCPStream(TrioTCPStream):
    """A TCP stream read in gulps.  Noise asks for its 2-byte length, then for
    up to 65535 bytes: several recv(2) calls and trips through trio's scheduler
    per 64 KiB (bench/bench_transfer.py).  One recv of up to 256 KiB serves
    them from memory."""

    GULP = 256 * 1024

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._rbuf, self._rpos = b"", 0

    async def read(self, n: int | None = None) -> bytes:
        if n == 0:
            return b""
        if self._rpos < len(self._rbuf):
            end = len(self._rbuf) if n is None else min(len(self._rbuf), self._rpos + n)
            out = self._rbuf[self._rpos:end]
            self._rpos = end
            return out
        data = await super().read(self.GULP if n is None else max(n, self.GULP))
        if n is None or len(data) <= n:
            return data
        self._rbuf, self._rpos = data, n
        return data[:n]


# libp2p builds its TCP streams from these module globals.
_libp2p_tcp.TrioTCPStream = _BufferedTCPStream
# A yamux data frame of 64 KiB plus its 12-byte header is 29 bytes too long for
# one Noise message: each went out as two (two encryptions, two writes, two
# reads).  Frames that fit one Noise message halve that work.
_libp2p_yamux.MAX_MESSAGE_SIZE = NOISE_MAX_PLAINTEXT
# The muxer negotiation builds yamux connections from its module global, not from muxer_opt.
_libp2p_muxer_multistream.Yamux = LeanYamux


class _RawStream:
    """Adapts a libp2p stream to framing's ByteStream (b"" at end of stream)."""

    def __init__(self, stream):
        self._s = stream

    async def read(self, n: int) -> bytes:
        try:
            return await self._s.read(n)
        except StreamEOF:
            return b""
        except StreamError as exc:
            log.debug("stream read ended: %s", exc)
            return b""

    async def write(self, data: bytes) -> None:
        try:
            await self._s.write(data)
        except StreamError as exc:
            raise MeshError(f"stream write failed: {exc}") from None

    async def close(self) -> None:
        try:
            await self._s.close()
        except Exception:  # closing a dead stream is not an error worth raising
            pass

    async def reset(self) -> None:
        try:
            await self._s.reset()
        except Exception:
            pass


async def _discard(stream) -> None:
    if stream is not None:
        try:
            await stream.reset()
        except Exception:  # already dead
            pass
    return None


async def _linger(raw: "_RawStream", within_s: float) -> None:
    """After our handler is done: wait (discarding) for the peer to end its side,
    then reset if it has not.  A stream whose peer never closes would otherwise
    stay in yamux with up to a window of unread bytes after we answered; an
    immediate reset could drop the answer still in flight to an honest peer."""
    with trio.move_on_after(within_s):
        while await raw.read(64 * 1024):
            pass
        return
    await raw.reset()


class _Notifee(INotifee):
    """Turns swarm connection callbacks into PeerEvents (first up / last down)."""

    def __init__(self, mesh: "Libp2pMesh"):
        self.mesh = mesh

    async def opened_stream(self, network, stream) -> None:
        pass

    async def closed_stream(self, network, stream) -> None:
        pass

    async def connected(self, network, conn) -> None:
        peer = conn.muxed_conn.peer_id
        if len(network.get_connections(peer)) <= 1:
            self.mesh._emit(PeerEvent("connected", peer.to_base58()))

    async def disconnected(self, network, conn) -> None:
        peer = conn.muxed_conn.peer_id
        if not [c for c in network.get_connections(peer) if c is not conn]:
            self.mesh._emit(PeerEvent("disconnected", peer.to_base58()))

    async def listen(self, network, multiaddr) -> None:
        pass

    async def listen_close(self, network, multiaddr) -> None:
        pass


def _is_relayed(conn) -> bool:
    try:
        return any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses())
    except Exception:
        return False


def _expand_wildcard(addr: multiaddr.Multiaddr) -> list[str]:
    """/ip4/0.0.0.0/... is not dialable: list it once per local IPv4 address (none at all
    when the host has no IPv4 address: a wildcard never leaves the node)."""
    text = str(addr)
    if "/ip4/0.0.0.0/" not in text:
        return [text] if addr_policy.dialable(text) else []
    import psutil
    ips = sorted({a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                  if a.family == socket.AF_INET})
    return [text.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/", 1) for ip in ips]


def _advertised(candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """The host's addrs_factory: listen + observed addresses, wildcards expanded, so that
    identify, AutoNAT, DCUtR and mDNS never hand out 0.0.0.0."""
    out: list[multiaddr.Multiaddr] = []
    for addr in candidates:
        for text in _expand_wildcard(addr):
            ma = multiaddr.Multiaddr(text)
            if ma not in out:
                out.append(ma)
    return out


def _identify_for_peer(mk_identify):
    """py-libp2p's identify hands every listen address to every peer. The observed address
    it is given is where we see the asking peer: keep only what that peer may be told
    (synord.protocols.addrs), and drop the signed peer record (it lists them all)."""
    def mk(host, observed_multiaddr):
        msg = mk_identify(host, observed_multiaddr)
        seen = str(observed_multiaddr) if observed_multiaddr is not None else None
        if seen is not None and "/p2p-circuit" in seen:
            seen = None  # relayed: the address is the relay's, not the peer's
        keep = []
        for raw in msg.listen_addrs:
            try:
                text = str(multiaddr.Multiaddr(bytes(raw)))
            except Exception:
                continue
            if addr_policy.may_tell(text, seen):
                keep.append(bytes(raw))
        if len(keep) != len(msg.listen_addrs):
            del msg.listen_addrs[:]
            msg.listen_addrs.extend(keep)
            msg.ClearField("signedPeerRecord")
        return msg
    mk.synord_filtered = True
    return mk


def _install_identify_filter() -> None:
    from libp2p.identity.identify import identify as _identify
    if not getattr(_identify._mk_identify_protobuf, "synord_filtered", False):
        _identify._mk_identify_protobuf = _identify_for_peer(_identify._mk_identify_protobuf)


class _LeanGossipSub(GossipSub):
    """GossipSub without the signed peer record (senderRecord) on message RPCs.

    py-libp2p attaches it to every publish/forward and every receiver parses
    and signature-checks it again for each copy it gets (~D copies per
    message per node); we learn addresses from connections and our own peer
    exchange, so it is pure CPU on a 2-core mesh."""

    def send_rpc(self, peer_id, rpc, priority: bool = False) -> None:
        if rpc.publish and rpc.HasField("senderRecord"):
            rpc.ClearField("senderRecord")  # the RPC is built per publish: safe to edit
        super().send_rpc(peer_id, rpc, priority)

    def mesh_heartbeat(self):
        """py-libp2p 0.8.1 bug: pruning an over-full mesh (> degree_high) does not put
        the pruned peer in backoff here, as the spec and go-libp2p (``prunePeer`` ->
        ``addBackoff``) do.  So when our mesh later drops below degree_low we GRAFT a
        peer we pruned seconds ago; it received our PRUNE and takes the GRAFT for a
        flood ("GRAFT flood detected", 280-480 a run at N=30), prunes us back and the
        mesh churns.  Back off from every peer we prune, as the spec says."""
        to_graft, to_prune = super().mesh_heartbeat()
        for peer, pruned_topics in to_prune.items():
            for topic in pruned_topics:
                self._add_back_off(peer, topic, False)
        return to_graft, to_prune


async def _no_auto_connect() -> None:
    return None


class Libp2pMesh(Mesh):
    def __init__(self, identity: Identity, config: MeshConfig | None = None):
        self.identity = identity
        self.config = config or MeshConfig()
        cfg = self.config
        key_pair = create_new_key_pair(identity.seed)
        self._sec_opt = {TProtocol(NOISE_ID): LeanNoiseTransport(
            key_pair, noise_privkey=create_x25519_key_pair().private_key)}
        conn_cfg = ConnectionConfig(
            max_connections=cfg.max_connections, max_connections_per_peer=1,
            min_connections=0, low_watermark=0, high_watermark=cfg.max_connections,
            dial_timeout=10.0,
            # the library's monitor drops a connection after one slow ping (false
            # positives on a loaded machine) and pings sequentially: we run our own
            enable_health_monitoring=False,
        )
        self.host = new_host(
            key_pair=key_pair, sec_opt=self._sec_opt, muxer_opt={TProtocol(YAMUX_ID): LeanYamux},
            listen_addrs=[multiaddr.Multiaddr(a) for a in cfg.listen],
            # mDNS is started by us once listening (see _mdns_loop): the library's would
            # advertise the unexpanded 0.0.0.0 listen address, which LAN peers dial in vain
            enable_mDNS=False, connection_config=conn_cfg,
            addrs_factory=_advertised,  # identify's observed addresses on (DCUtR needs them)
        )
        _install_identify_filter()
        # We dial ourselves, bounded (target_peers, peer exchange, the DHT's lookups). The
        # library's auto-connector would aim at (low + high watermark) / 2 = 64
        # connections, dialling whatever the peerstore holds (the DHT fills it).
        self.host.get_network().auto_connector.maybe_connect = _no_auto_connect
        self.mdns_addrs: list[str] = []  # what mDNS advertises on the LAN
        self.dials: dict[str, int] = {}  # scope (synord.protocols.addrs) -> dials attempted
        self._guard_dials()
        from .p2p_autonat import AutoNAT  # needs self.host
        self.reachability = Reachability()
        self.autonat = AutoNAT(self, self.reachability)
        self.relays: list[str] = []  # circuit addresses in use, set by the relay client
        if self.host.get_id().to_base58() != identity.peer_id:
            raise MeshError("libp2p derived a different peer id from our key")
        self.router = _LeanGossipSub(
            protocols=[PROTOCOL_ID_V11, GOSSIP_V10], degree=4, degree_low=3, degree_high=8,
            heartbeat_interval=1, spam_protection_enabled=False,
            adaptive_gossip_enabled=False, eclipse_protection_enabled=False,
        )
        self.pubsub = Pubsub(self.host, self.router, strict_signing=True)
        self._event_channels: list[trio.MemorySendChannel] = []
        self._validated: OrderedDict[tuple[bytes, bytes], object] = OrderedDict()
        self._nursery: trio.Nursery | None = None
        self._px_queue_send, self._px_queue_recv = trio.open_memory_channel(256)
        self._dialing: set[str] = set()
        self._watched: set[str] = set()
        self._dial_failures: dict[str, tuple[int, float]] = {}  # peer -> (count, retry_at)
        self.dropped_messages = 0
        self.stream_budget = StreamBudget(cfg.streams)
        # circuit relay + hole punching (synord.relay.RelayService sets itself here):
        # dials through relays when a peer has no direct route, adds our /p2p-circuit addrs
        self.circuit = None
        self.host.get_network().register_notifee(_Notifee(self))
        self._pinged_at: dict[str, float] = {}  # peer -> when it last pinged us
        self.host.set_stream_handler(PING_ID, self._answer_pings)
        if cfg.peer_exchange:
            self.set_request_handler(PX_PROTOCOL, self._serve_px, max_request=1024)
        self.dht: SynordDHT | None = None
        mode = choose_mode(cfg.dht, "unknown", self._listen_ips())
        if mode != "off":
            self.dht = SynordDHT(self.host, mode, self.listen_addrs, budget=self.stream_budget,
                                 seen_at=self.seen_at, limits=cfg.streams)

    # -- lifecycle -----------------------------------------------------------
    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listen = [multiaddr.Multiaddr(a) for a in self.config.listen]
        async with background_trio_service(self.pubsub):
            async with background_trio_service(self.router):
                async with self.host.run(listen):
                    self._check_listening(listen)
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        if self.dht is not None:
                            await nursery.start(self.dht.serve)
                        for addr in self.config.bootstrap:
                            nursery.start_soon(self._keep_connected, addr)
                        if self.config.peer_exchange:
                            nursery.start_soon(self._px_loop)
                        nursery.start_soon(self.autonat.run)
                        for pid in self.host.get_connected_peers():
                            self._start_watch(pid.to_base58())
                        if self.config.mdns:
                            await nursery.start(self._mdns_loop)
                        task_status.started()
                        try:
                            await trio.sleep_forever()
                        finally:
                            self._nursery = None
                            for ch in self._event_channels:
                                ch.close()
                            # say goodbye: peers drop us now instead of after missed pings
                            with trio.CancelScope(shield=True), trio.move_on_after(2):
                                async with trio.open_nursery() as bye:
                                    for pid in self.host.get_connected_peers():
                                        bye.start_soon(self._goodbye, pid)

    def _check_listening(self, listen: list[multiaddr.Multiaddr]) -> None:
        """The library logs a failed listen at debug level and runs on: refuse to start
        without every configured address (busy port, address not on this host)."""
        bound = set(self.host.get_network().listeners)
        for addr in listen:
            if str(addr) not in bound:
                try:
                    why = _listen_errors.get(int(addr.value_for_protocol("tcp")), "cannot listen there")
                except (ValueError, TypeError, multiaddr.exceptions.Error):
                    why = "not a TCP address"
                raise MeshError(f"node.listen {addr}: {why}")

    async def _goodbye(self, pid: ID) -> None:
        try:
            await self.host.disconnect(pid)
        except Exception:  # already gone
            pass

    # -- addresses and peers -------------------------------------------------
    def listen_addrs(self) -> list[str]:
        out: list[str] = []
        for addr in self.host.get_addrs():
            out.extend(_expand_wildcard(addr))
        if self.circuit is not None:
            out.extend(self.circuit.own_addrs())
        return out

    def relayed_only(self, peer_id: str) -> bool:
        """Connected to ``peer_id`` through a relay only (no direct connection)."""
        try:
            conns = self.host.get_network().get_connections(ID.from_base58(peer_id))
        except Exception:
            return False
        return bool(conns) and all(_is_relayed(c) for c in conns)

    def security_protocols(self) -> list[str]:
        return [str(p) for p in self.host.get_network().upgrader.security_multistream.transports]

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self.host.get_connected_peers()]

    def peer_addrs(self, peer_id: str) -> list[str]:
        try:
            addrs = self.host.get_peerstore().addrs(ID.from_base58(peer_id))
        except Exception:
            return []
        return addr_policy.dial_candidates([str(a) for a in addrs])

    def addrs_to_tell(self, peer_id: str, to: str) -> list[str]:
        return addr_policy.tell_about(self.dialable_addrs(peer_id), self.seen_at(to),
                                      self.seen_at(peer_id))

    def set_relays(self, addrs: list[str]) -> None:
        """The relay client's hook: our /p2p-circuit addresses in use (status, doctor)."""
        self.relays = list(addrs)

    def reachability_json(self) -> dict:
        """`status --json` reachability and what `doctor` explains it from."""
        listen = self.listen_addrs()
        local_ips = [ip for ip in (addr_policy.ip_of(a) for a in listen) if ip]
        out = self.reachability.to_json(time.time(), local_ips)
        connected = set(self.connected_peers())
        out.update({
            "relays": list(self.relays),
            "listen_addrs": listen,
            "mdns": {"enabled": self.config.mdns, "advertised": list(self.mdns_addrs),
                     "lan_peers": sum(1 for p in connected if addr_policy.scope_of_ip(
                         self.seen_at(p) or "") == addr_policy.PRIVATE)},
            "bootstrap": [{"addr": a, "connected": a.rsplit("/p2p/", 1)[-1] in connected}
                          for a in self.config.bootstrap],
            "dials": dict(self.dials),
            "autonat_served": self.autonat.served,
        })
        return out

    def seen_at(self, peer_id: str) -> str | None:
        """The IP a connected peer's (direct) connection comes from; None if relayed or gone."""
        try:
            conns = self.host.get_network().get_connections(ID.from_base58(peer_id))
        except Exception:
            return None
        for conn in conns or []:
            muxed = getattr(conn, "muxed_conn", None)
            try:
                if any("/p2p-circuit" in str(a) for a in muxed.get_transport_addresses()):
                    continue
                remote = muxed.get_remote_address()
            except Exception:
                continue
            if remote:
                return remote[0]
        return None

    def _guard_dials(self) -> None:
        """Every dial of the host (ours, the library's: identify, DCUtR, AutoNAT) passes
        here: never 0.0.0.0/::, each one logged and counted by scope."""
        network = self.host.get_network()
        dial_one = network._dial_addr_single_attempt  # py-libp2p 0.8.1's single choke point

        async def guarded(addr, peer_id, source=None):
            text = str(addr)
            kind = addr_policy.scope(text)
            if kind == addr_policy.UNSPECIFIED:
                REFUSALS.count("dial", "unspecified-address")
                raise MeshError(f"refusing to dial unspecified address {text}")
            self.dials[kind] = self.dials.get(kind, 0) + 1
            log.debug("dial %s", text)
            return await dial_one(addr, peer_id, source)

        network._dial_addr_single_attempt = guarded

    async def dial(self, addr: str) -> str:
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:
            raise MeshError(f"not a dialable multiaddr with /p2p/<id>: {addr!r} ({exc})") from None
        await self._connect(info)
        return info.peer_id.to_base58()

    async def _connect(self, info: PeerInfo) -> None:
        if info.peer_id == self.host.get_id():
            raise MeshError("refusing to dial ourselves")
        usable = addr_policy.dial_candidates([str(a) for a in info.addrs])
        if info.addrs and not usable:  # counted once here, not per library retry
            REFUSALS.count("dial", "unspecified-address")
            raise MeshError(f"dial {info.peer_id}: no dialable address in "
                            f"{[str(a) for a in info.addrs]}")
        info = PeerInfo(info.peer_id, [multiaddr.Multiaddr(a) for a in usable])
        direct = [a for a in info.addrs if "/p2p-circuit" not in str(a)]
        # the swarm refuses a peer for 60 s after one failed dial; our callers pace their
        # own retries (a relay that restarted would otherwise stay unreachable for a minute)
        self.host.get_network()._negative_peer_cache.evict(str(info.peer_id))
        try:
            if not direct and self.circuit is not None:
                raise MeshError("no direct address")
            with trio.fail_after(self.config.backoff_max_s):
                await self.host.connect(PeerInfo(info.peer_id, direct))
        except Exception as exc:
            if isinstance(exc, trio.TooSlowError):
                exc = MeshError(f"dial {info.peer_id} timed out")
            elif not isinstance(exc, MeshError):
                exc = MeshError(f"dial {info.peer_id} failed: {type(exc).__name__}: {exc}")
            # no direct route (NAT): through a relay, if we have any
            if self.circuit is None or not await self.circuit.dial(
                    info.peer_id.to_base58(), [str(a) for a in info.addrs]):
                raise exc from None

    def events(self, buffer: int = 256) -> trio.MemoryReceiveChannel:
        send, recv = trio.open_memory_channel(buffer)
        self._event_channels.append(send)
        return recv

    def _start_watch(self, peer_id: str) -> None:
        if self._nursery is not None and peer_id not in self._watched:
            self._watched.add(peer_id)
            self._nursery.start_soon(self._watch_peer, ID.from_base58(peer_id))

    def _emit(self, event: PeerEvent) -> None:
        if event.kind == "connected":
            self._start_watch(event.peer_id)
            if self.dht is not None and self._nursery is not None:
                self._nursery.start_soon(self.dht.peer_connected, event.peer_id)
            self.autonat.peer_connected()
        elif event.kind == "disconnected":
            self.reachability.forget_observer(event.peer_id)  # its view of us is gone with it
        if event.kind == "connected" and self.config.peer_exchange:
            try:
                self._px_queue_send.send_nowait(event.peer_id)
            except (trio.WouldBlock, trio.ClosedResourceError):
                pass
        for ch in list(self._event_channels):
            try:
                ch.send_nowait(event)
            except trio.WouldBlock:
                log.warning("peer event reader is slow; dropped %s", event)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._event_channels.remove(ch)

    # -- gossip --------------------------------------------------------------
    async def publish(self, topic: str, data: bytes) -> None:
        await self.pubsub.publish(topic, data)

    async def subscribe(self, topic: str, validator: Validator | None = None,
                        buffer: int = 1024) -> trio.MemoryReceiveChannel:
        if self._nursery is None:
            raise MeshError("subscribe() needs a running mesh (await nursery.start(mesh.run))")
        if validator is not None:
            self.pubsub.set_topic_validator(topic, self._wrap_validator(validator), False)
        sub = await self.pubsub.subscribe(topic)
        send, recv = trio.open_memory_channel(buffer)
        self._nursery.start_soon(self._pump, topic, sub, send)
        return recv

    def _wrap_validator(self, validator: Validator):
        def libp2p_validator(forwarder: ID, msg) -> bool:
            try:
                value = validator(msg.data, ID(msg.from_id).to_base58())
            except Exception:  # a buggy validator must reject, never crash the router
                log.exception("topic validator failed")
                return False
            if value is None or value is False:
                return False
            # handed to the subscription pump, which sees the same message next
            self._validated[(msg.from_id, msg.seqno)] = value
            while len(self._validated) > 4096:
                self._validated.popitem(last=False)
            return True
        return libp2p_validator

    async def _pump(self, topic: str, sub, send: trio.MemorySendChannel) -> None:
        # Drain the library's 32-slot queue at once; ours is larger and counts drops.
        async with send:
            while True:
                msg = await sub.get()
                value = self._validated.pop((msg.from_id, msg.seqno), None)
                try:
                    send.send_nowait(GossipMessage(topic, msg.data, ID(msg.from_id).to_base58(), value))
                except trio.WouldBlock:
                    self.dropped_messages += 1
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    await self.pubsub.unsubscribe(topic)
                    return

    # -- streams -------------------------------------------------------------
    def set_handler(self, protocol: str, handler: StreamHandler, idle_deadline: bool = True) -> None:
        limits = self.config.streams

        async def libp2p_handler(stream) -> None:
            peer = stream.muxed_conn.peer_id.to_base58()
            refusal = self.stream_budget.open_stream(peer)  # counted by the budget
            if refusal is not None:
                log.info("stream %s from %s refused: %s", protocol, peer[:16], refusal)
                await _discard(stream)
                return
            guard = StreamGuard(self.stream_budget, peer, limits, inbound=True, idle=idle_deadline)
            framed = FramedStream(_RawStream(stream), remote_peer=peer, protocol=protocol, guard=guard)
            try:
                await handler(framed)
            except StreamLimitError as exc:  # already reset and counted
                log.info("stream %s from %s: %s", protocol, peer[:16], exc)
            except Exception as exc:  # one bad stream must not hurt the node
                log.info("handler %s for %s failed: %s: %s", protocol, peer[:16], type(exc).__name__, exc)
                await framed.reset()
            finally:
                framed.release()
                try:
                    await _linger(framed.raw, limits.frame_s)
                finally:
                    self.stream_budget.close_stream(peer)

        self.host.set_stream_handler(TProtocol(protocol), libp2p_handler)

    async def open_stream(self, peer_id: str, protocol: str) -> FramedStream:
        if self.circuit is not None and peer_id not in self.connected_peers():
            # the library's dial skips /p2p-circuit addresses: reach NATed peers ourselves
            with trio.move_on_after(self.config.backoff_max_s):
                try:
                    await self._connect(PeerInfo(ID.from_base58(peer_id), [
                        multiaddr.Multiaddr(a) for a in self.peer_addrs(peer_id)]))
                except Exception as exc:  # new_stream below says why, as before
                    log.debug("reach %s: %s", peer_id[:16], exc)
        try:
            stream = await self.host.new_stream(ID.from_base58(peer_id), [TProtocol(protocol)])
        except Exception as exc:
            # not connected and its known addresses failed: it may have moved (e.g. a
            # consumer restarted elsewhere before its receipt came): ask the DHT, once
            moved = False
            if self.dht is not None and peer_id not in self.connected_peers():
                with trio.move_on_after(MOVED_LOOKUP_S):
                    moved = await self.reach_moved(peer_id)
            if not moved:
                raise MeshError(f"open {protocol} to {peer_id[:16]}: {type(exc).__name__}: {exc}") from None
            try:
                stream = await self.host.new_stream(ID.from_base58(peer_id), [TProtocol(protocol)])
            except Exception as exc2:
                raise MeshError(f"open {protocol} to {peer_id[:16]}: {type(exc2).__name__}: {exc2}") from None
        guard = StreamGuard(None, peer_id, self.config.streams, inbound=False)
        return FramedStream(_RawStream(stream), remote_peer=peer_id, protocol=protocol, guard=guard)

    # -- DHT: peer routing and providers (synord.protocols.dht) --------------------
    def _listen_ips(self) -> list[str]:
        ips = []
        for a in self.config.listen:
            for text in _expand_wildcard(multiaddr.Multiaddr(a)):
                parts = text.split("/")
                if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
                    ips.append(parts[2])
        return ips

    async def find_peer(self, peer_id: str) -> list[str]:
        if self.dht is None or peer_id == self.peer_id:
            return []
        try:
            return await self.dht.find_peer_addrs(peer_id)
        except Exception as exc:  # a bad id, a lookup that broke: nothing found
            log.debug("find_peer %s: %s", peer_id[:16], exc)
            return []

    def provide(self, key: bytes) -> None:
        if self.dht is not None:
            self.dht.provide_key(key)

    def unprovide(self, key: bytes) -> None:
        if self.dht is not None:
            self.dht.unprovide_key(key)

    async def find_providers(self, key: bytes, count: int = 20) -> list[tuple[str, list[str]]]:
        if self.dht is None:
            return []
        try:
            return await self.dht.find_providers_of(key, count)
        except Exception as exc:
            log.debug("find_providers: %s", exc)
            return []

    async def set_reachability(self, reachability: str) -> None:
        """AutoNAT's verdict (public / private / unknown) moves `[dht] mode = auto`
        between server and client mode."""
        if self.dht is None:
            return
        mode = choose_mode(self.config.dht, reachability, self._listen_ips())
        if mode != self.dht.mode_name and mode in ("server", "client"):
            await self.dht.switch_mode(DHTMode.SERVER if mode == "server" else DHTMode.CLIENT)

    def dht_json(self) -> dict:
        return self.dht.info_json() if self.dht is not None else {"mode": "off"}

    # -- health: drop frozen peers --------------------------------------------
    async def _answer_pings(self, stream) -> None:
        """/ipfs/ping/1.0.0, as the library answers it, but noting when each peer
        last pinged us: a peer that pings us is alive, and need not be pinged back."""
        peer = stream.muxed_conn.peer_id.to_base58()
        try:
            while True:
                # the library's handler gives up after 10 s without a ping too
                with trio.move_on_after(PING_IDLE_S):
                    payload = await read_exactly(stream, PING_LENGTH)
                    self._pinged_at[peer] = trio.current_time()
                    await stream.write(payload)
                    continue
                return
        except Exception:  # EOF, reset, a short read: the pinger opens a new stream
            pass
        finally:
            self._pinged_at.pop(peer, None)  # no entries left behind by peers that come and go
            await _discard(stream)

    async def _watch_peer(self, pid: ID) -> None:
        """Ping a connected peer every interval on one long-lived /ipfs/ping/1.0.0
        stream (a new stream per ping cost ~1 core on a 30-node test mesh);
        disconnect after ``ping_misses`` misses in a row: a SIGSTOPped peer
        keeps its TCP connection open forever otherwise.  Skip the ping while the
        peer pings us (it is alive): both sides of a link pinged, now mostly one."""
        cfg, stream, misses = self.config, None, 0
        peer = pid.to_base58()
        try:
            while True:
                # jittered, so the two ends of a link fall out of step and one stays quiet
                await trio.sleep(cfg.health_interval_s * random.uniform(0.8, 1.2))
                if not self.host.get_network().get_connections(pid):
                    return
                if trio.current_time() - self._pinged_at.get(peer, -math.inf) < 1.5 * cfg.health_interval_s:
                    misses = 0
                    stream = await _discard(stream)  # idle, the peer's handler would drop it
                    continue
                ok = False
                with trio.move_on_after(cfg.ping_timeout_s):
                    try:
                        if stream is None:
                            stream = await self.host.new_stream(pid, [PING_ID])
                        payload = os.urandom(PING_LENGTH)
                        await stream.write(payload)
                        got = b""
                        while len(got) < PING_LENGTH:
                            chunk = await stream.read(PING_LENGTH - len(got))
                            if not chunk:
                                break
                            got += chunk
                        ok = got == payload
                    except Exception as exc:  # any failure is a miss; the stream is redone
                        log.debug("ping %s: %s", pid, exc)
                if ok:
                    misses = 0
                    continue
                misses += 1
                stream = await _discard(stream)
                if misses >= cfg.ping_misses:
                    log.info("peer %s missed %d pings: disconnecting", pid.to_base58()[:16], misses)
                    with trio.move_on_after(5):
                        try:
                            await self.host.disconnect(pid)
                        except Exception as exc:
                            log.debug("disconnect %s: %s", pid, exc)
                    return
        finally:
            self._watched.discard(peer)
            self._pinged_at.pop(peer, None)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await _discard(stream)

    # -- discovery: bootstrap, peer exchange, mDNS ----------------------------
    async def _keep_connected(self, addr: str) -> None:
        """Stay connected to a bootstrap peer, redialling with exponential backoff."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:
            log.error("bootstrap address %r ignored: needs /p2p/<id> (%s)", addr, exc)
            return
        if info.peer_id == self.host.get_id():
            return
        delay = self.config.backoff_min_s
        while True:
            if self.host.get_network().get_connections(info.peer_id):
                delay = self.config.backoff_min_s
                await trio.sleep(1.0)
                continue
            try:
                await self._connect(info)
                delay = self.config.backoff_min_s
            except MeshError as exc:
                log.info("bootstrap %s: %s; retry in %.1fs", addr, exc, delay)
                await trio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.config.backoff_max_s)

    async def _serve_px(self, peer_id: str, payload: bytes) -> bytes:
        peers = []
        asker_at = self.seen_at(peer_id)
        for p in self.host.get_connected_peers():
            pid = p.to_base58()
            if pid == peer_id:
                continue
            # never a private address learnt behind one router to a peer behind another
            addrs = addr_policy.tell_about(self.peer_addrs(pid), asker_at, self.seen_at(pid))
            if addrs:
                peers.append([pid, addrs[:8]])
            if len(peers) >= PX_MAX_PEERS:
                break
        return msgpack.packb(peers, use_bin_type=True)

    async def _px_loop(self) -> None:
        """Ask newly connected peers (and, periodically, a few others) whom they know.
        The periodic round doubles its interval (up to PX_MAX_STRETCH times) while our
        connections stay the same, and asks no one when we have target_peers: an idle,
        settled node would otherwise open 0.3 streams a second for nothing new."""
        interval, last_count = self.config.px_interval_s, -1
        async with trio.open_nursery() as nursery:
            while True:
                targets: list[str] = []
                with trio.move_on_after(interval * random.uniform(0.8, 1.2)):
                    targets.append(await self._px_queue_recv.receive())
                if not targets:
                    connected = self.connected_peers()
                    if len(connected) == last_count:
                        interval = min(interval * 2, self.config.px_interval_s * PX_MAX_STRETCH)
                    else:
                        interval, last_count = self.config.px_interval_s, len(connected)
                    if len(connected) < self.config.target_peers:
                        targets = random.sample(connected, min(3, len(connected)))
                for peer in targets:
                    nursery.start_soon(self._exchange_with, peer)

    async def _exchange_with(self, peer: str) -> None:
        try:
            reply = await self.request(peer, PX_PROTOCOL, b"", timeout=5.0, max_reply=256 * 1024)
            peers = parse_px_reply(reply)
        except Exception as exc:
            log.debug("peer exchange with %s failed: %s", peer[:16], exc)
            return
        # every asker gets the same list (connection order): without shuffling,
        # all newcomers dial the oldest peers, which end up connected to everyone
        random.shuffle(peers)
        for pid, addrs in peers:
            self._consider(pid, addrs)

    def _consider(self, peer_id: str, addrs: list[str]) -> None:
        """Dial a discovered peer unless connected, saturated or backing off."""
        if peer_id == self.peer_id or peer_id in self._dialing or self._nursery is None:
            return
        # count dials in flight: one PX reply must not start a dial to every peer it lists
        if len(self.host.get_connected_peers()) + len(self._dialing) >= self.config.target_peers:
            return
        try:
            pid = ID.from_base58(peer_id)
            maddrs = [multiaddr.Multiaddr(a) for a in addr_policy.dial_candidates(addrs)]
        except Exception:
            return
        if not maddrs:
            return
        if self.host.get_network().get_connections(pid):
            return
        count, retry_at = self._dial_failures.get(peer_id, (0, 0.0))
        if trio.current_time() < retry_at:
            return
        self._dialing.add(peer_id)
        self._nursery.start_soon(self._dial_discovered, PeerInfo(pid, maddrs))

    async def _dial_discovered(self, info: PeerInfo) -> None:
        pid = info.peer_id.to_base58()
        try:
            await self._connect(info)
            self._dial_failures.pop(pid, None)
        except MeshError as exc:
            count = self._dial_failures.get(pid, (0, 0.0))[0] + 1
            delay = min(self.config.backoff_min_s * 2 ** count, self.config.backoff_max_s * 4)
            self._dial_failures[pid] = (count, trio.current_time() + delay)
            log.debug("dial %s: %s", pid[:16], exc)
        finally:
            self._dialing.discard(pid)

    async def _mdns_loop(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # zeroconf calls back on its own thread: hop onto trio with the token.
        token = trio.lowlevel.current_trio_token()
        send, recv = trio.open_memory_channel(64)

        def on_found(info: PeerInfo) -> None:
            def deliver():
                try:
                    send.send_nowait(info)
                except (trio.WouldBlock, trio.ClosedResourceError):
                    pass
            try:
                token.run_sync_soon(deliver)
            except trio.RunFinishedError:
                pass

        peerDiscovery.register_peer_discovered_handler(on_found)
        mdns = None
        try:
            try:
                mdns = await trio.to_thread.run_sync(self._start_mdns)
            except Exception as exc:  # no multicast here (port 5353 taken, no interface)
                log.warning("mDNS off: %s: %s", type(exc).__name__, exc)
            task_status.started()
            async for info in recv:
                self._consider(info.peer_id.to_base58(), [str(a) for a in info.addrs])
        finally:
            peerDiscovery.unregister_peer_discovered_handler(on_found)
            if mdns is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(3):
                    await trio.to_thread.run_sync(self._stop_mdns, mdns, abandon_on_cancel=True)

    def _start_mdns(self):
        """Advertise our expanded, non-loopback addresses (LAN peers may have private ones:
        mDNS stays on the LAN). Blocking (zeroconf probes): runs on a worker thread."""
        from libp2p.discovery.mdns.mdns import create_mdns_discovery
        mine = [a.split("/p2p/")[0] for a in self.listen_addrs()
                if addr_policy.scope(a) not in (addr_policy.LOOPBACK, addr_policy.UNSPECIFIED)]
        self.mdns_addrs = mine
        mdns = create_mdns_discovery(self.host.get_network(), listen_addrs=mine)
        mdns.synord_registered = bool(mine)
        if mine:  # a loopback-only node has nothing to tell the LAN; it still listens
            mdns.broadcaster.register()
        return mdns

    @staticmethod
    def _stop_mdns(mdns) -> None:
        try:
            if mdns.synord_registered:
                mdns.broadcaster.unregister()
            mdns.listener.stop()
        finally:
            mdns.zeroconf.close()


def create_mesh(identity: Identity, config: MeshConfig) -> Mesh:
    """The default backend (py-libp2p). It lives here, not in synord.protocols.mesh, so the
    interface module never imports its (heavy) implementation: callers that want
    one import this module when they start a mesh."""
    return Libp2pMesh(identity, config)
