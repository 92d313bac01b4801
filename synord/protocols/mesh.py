"""Our mesh interface: what the daemon needs from a libp2p stack, and no more.

Everything above this module talks to `Mesh`; `synord.protocols.p2p.Libp2pMesh` is
the py-libp2p implementation.  Another backend (e.g. the go-libp2p daemon)
can replace it by implementing the same methods.  No libp2p import here: the
CLI imports this module and must start fast.

Conventions:
- peers are text peer ids ("12D3KooW..."), addresses are multiaddr strings;
- `listen_addrs()` gives full multiaddrs ending in /p2p/<id>;
- a topic validator is ``fn(data, origin_peer_id) -> value | None``: None
  rejects (the message is neither delivered nor forwarded), anything else
  accepts and travels with the delivered `GossipMessage` as ``value``;
- stream protocols speak `synord.protocols.framing` (length-prefixed msgpack frames
  and chunked blobs); request/response is one blob each way.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from .envelope import Envelope, EnvelopeValidator, Rejected
from .framing import FramedStream
from .identity import Identity, IdentityError, b58decode
from .streamlimits import StreamLimits

PROTOCOL_PREFIX = "/synord/"
PX_PROTOCOL = "/synord/px/1.0.0"


def protocol_id(name: str, version: str = "1.0.0") -> str:
    """The versioned stream protocol id for ``name``: /synord/<name>/<version>."""
    return f"{PROTOCOL_PREFIX}{name}/{version}"


class MeshError(Exception):
    """A mesh operation failed (dial, stream, request); the text says why."""


@dataclass(frozen=True)
class PeerEvent:
    kind: str  # "connected" | "disconnected"
    peer_id: str


@dataclass(frozen=True)
class GossipMessage:
    topic: str
    data: bytes
    origin: str          # peer id of the publisher (libp2p-signed)
    value: Any = None    # what the topic validator returned


Validator = Callable[[bytes, str], Any]
StreamHandler = Callable[[FramedStream], Awaitable[None]]
RequestHandler = Callable[[str, bytes], Awaitable[bytes]]


@dataclass
class MeshConfig:
    listen: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/4001"])
    bootstrap: list[str] = field(default_factory=list)
    mdns: bool = True
    peer_exchange: bool = True
    target_peers: int = 12        # stop dialling peer-exchange candidates above this many connections
    max_connections: int = 128
    px_interval_s: float = 10.0
    health_interval_s: float = 3.0  # ping every connection this often ...
    ping_timeout_s: float = 5.0     # ... a ping slower than this is a miss ...
    ping_misses: int = 2            # ... and this many misses in a row drop it
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    streams: StreamLimits = field(default_factory=StreamLimits)  # deadlines and caps for peers' streams
    dht: str = "auto"  # Kademlia mode: auto | server | client | off (synord.protocols.kad.choose_mode)


class Mesh(abc.ABC):
    """One node's view of the mesh. Run it with ``await nursery.start(mesh.run)``."""

    identity: Identity
    config: MeshConfig

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @abc.abstractmethod
    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen, discover and serve until cancelled; started once listening."""

    @abc.abstractmethod
    def listen_addrs(self) -> list[str]: ...

    @abc.abstractmethod
    def security_protocols(self) -> list[str]:
        """Security protocol ids this node offers (only /noise)."""

    @abc.abstractmethod
    async def dial(self, addr: str) -> str:
        """Connect to a full multiaddr (with /p2p/<id>); returns the peer id."""

    @abc.abstractmethod
    def connected_peers(self) -> list[str]: ...

    @abc.abstractmethod
    def peer_addrs(self, peer_id: str) -> list[str]: ...

    @abc.abstractmethod
    def events(self, buffer: int = 256) -> trio.MemoryReceiveChannel:
        """A new channel of PeerEvent (connected / disconnected) for one reader."""

    @abc.abstractmethod
    async def publish(self, topic: str, data: bytes) -> None: ...

    @abc.abstractmethod
    async def subscribe(self, topic: str, validator: Validator | None = None,
                        buffer: int = 1024) -> trio.MemoryReceiveChannel:
        """Join ``topic``; returns a channel of GossipMessage that passed ``validator``."""

    @abc.abstractmethod
    def set_handler(self, protocol: str, handler: StreamHandler, idle_deadline: bool = True) -> None:
        """Serve ``protocol`` with ``handler``, under ``config.streams`` (see
        `synord.protocols.streamlimits`); ``idle_deadline=False`` for protocols whose
        peer may stay quiet between frames once its first frame was accepted."""

    @abc.abstractmethod
    async def open_stream(self, peer_id: str, protocol: str) -> FramedStream: ...

    def reachability_json(self) -> dict:
        """Whether the internet reaches this node (AutoNAT), for `status` and `doctor`."""
        return {"status": "unknown", "observed_addrs": [], "relays": []}

    def addrs_to_tell(self, peer_id: str, to: str) -> list[str]:
        """``peer_id``'s full addresses that may be handed to peer ``to`` (no private address
        of one LAN to a peer on another: synord.protocols.addrs)."""
        return self.dialable_addrs(peer_id)

    def dialable_addrs(self, peer_id: str) -> list[str]:
        """``peer_id``'s known addresses as full multiaddrs (ending in /p2p/<id>),
        for handing to another node or keeping across a restart."""
        return [a if "/p2p/" in a else f"{a}/p2p/{peer_id}" for a in self.peer_addrs(peer_id)]

    def relayed_only(self, peer_id: str) -> bool:
        """True while our only connection to ``peer_id`` runs through a circuit relay."""
        return False

    async def reach(self, peer_id: str, addrs: Iterable[str], per_addr_s: float = 5.0) -> bool:
        """Make sure we are connected to ``peer_id``, dialling ``addrs`` in turn if not."""
        if peer_id in self.connected_peers():
            return True
        for addr in addrs:
            with trio.move_on_after(per_addr_s):
                try:
                    await self.dial(str(addr))
                    return True
                except MeshError:
                    continue  # the next address may work
        # none of them works (the peer moved, or we never knew it): ask the DHT
        return peer_id in self.connected_peers() or await self.reach_moved(peer_id, per_addr_s)

    async def reach_moved(self, peer_id: str, per_addr_s: float = 5.0) -> bool:
        """Dial ``peer_id`` at the addresses the DHT knows for it now."""
        for addr in await self.find_peer(peer_id):
            with trio.move_on_after(per_addr_s):
                try:
                    await self.dial(addr)
                    return True
                except MeshError:
                    continue  # the next address may work
        return peer_id in self.connected_peers()

    # -- DHT (peer routing, providers); a backend without one finds nothing ------
    async def find_peer(self, peer_id: str) -> list[str]:
        """``peer_id``'s current dialable addresses, looked up in the DHT."""
        return []

    def provide(self, key: bytes) -> None:
        """Announce in the DHT that we provide ``key`` (kept up until `unprovide`)."""

    def unprovide(self, key: bytes) -> None:
        """Stop announcing ``key``."""

    async def find_providers(self, key: bytes, count: int = 20) -> list[tuple[str, list[str]]]:
        """[(peer id, dialable addresses)] of the peers that provide ``key``."""
        return []

    def dht_json(self) -> dict:
        return {"mode": "off"}

    def set_request_handler(self, protocol: str, handler: RequestHandler,
                            max_request: int = 64 * 1024 * 1024) -> None:
        """Serve request/response: ``handler(peer_id, payload) -> reply``."""

        async def serve(stream: FramedStream) -> None:
            try:
                payload = await stream.receive_blob(max_request)
                try:
                    reply = await handler(stream.remote_peer, payload)
                except Exception as exc:  # the handler's failure goes back as an answer
                    await stream.send_error(f"{type(exc).__name__}: {exc}")
                else:
                    await stream.send_blob(reply)
            finally:
                await stream.close()

        self.set_handler(protocol, serve)

    async def request(self, peer_id: str, protocol: str, payload: bytes,
                      timeout: float = 30.0, max_reply: int = 1024 * 1024 * 1024) -> bytes:
        """Send ``payload`` to ``peer_id`` on ``protocol``; returns the reply."""
        with trio.fail_after(timeout):
            stream = await self.open_stream(peer_id, protocol)
            try:
                await stream.send_blob(payload)
                return await stream.receive_blob(max_reply)
            finally:
                with trio.move_on_after(1):
                    await stream.close()


def envelope_validator(validator: EnvelopeValidator, types: Iterable[str] | None = None,
                       on_reject: Callable[[Rejected], None] | None = None) -> Validator:
    """A topic validator that accepts only valid envelopes published by their signer.

    ``types`` restricts which envelope types the topic carries.  The sender
    must be the gossip origin (so nobody republishes another peer's envelope
    under its own name); rate limits apply per origin.
    """
    allowed = frozenset(types) if types is not None else None

    def check(data: bytes, origin: str) -> Envelope | None:
        try:
            origin_bytes = b58decode(origin)
        except IdentityError:
            origin_bytes = None
        result = validator.check(data, peer=origin_bytes)
        if isinstance(result, Rejected):
            if on_reject:
                on_reject(result)
            return None
        if result.sender != origin_bytes:
            validator.rejected["sender_mismatch"] += 1
            return None
        if allowed is not None and result.type not in allowed:
            validator.rejected["wrong_topic"] += 1
            return None
        return result

    return check


PX_MAX_PEERS = 64
PX_MAX_ADDRS = 8


def parse_px_reply(reply: bytes) -> list[tuple[str, list[str]]]:
    """A peer-exchange answer: ``[[peer_id, [multiaddr, ...]], ...]``.  Raises
    ValueError if it is not such a list; entries of the wrong shape are skipped,
    and at most PX_MAX_PEERS peers with PX_MAX_ADDRS addresses each are kept."""
    try:
        peers = msgpack.unpackb(reply, raw=False, max_str_len=4096, max_bin_len=0,
                                max_array_len=4096, max_map_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises many types on garbage
        raise ValueError(f"px reply is not msgpack: {type(exc).__name__}") from None
    if not isinstance(peers, list):
        raise ValueError("px reply is not a list")
    out = []
    for entry in peers[:PX_MAX_PEERS]:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], list)):
            continue
        addrs = [a for a in entry[1][:PX_MAX_ADDRS] if isinstance(a, str) and a.startswith("/")]
        out.append((entry[0], addrs))
    return out

