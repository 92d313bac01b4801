"""AutoNAT v1 on the py-libp2p host: serve dial-backs, ask peers, feed ``Reachability``.

The decisions (whom to ask, what the votes mean, when to ask again, the NAT type) live in
synord.protocols.reachability; this module is the I/O around py-libp2p 0.8.1's
``libp2p.host.autonat`` with two fixes:
- its server "dials back" with ``host.connect``, which returns at once when the asker is
  already connected -- that is, always: every asker would be told it is public. We dial a
  fresh TCP connection to the address and run the Noise handshake, which proves that the
  asker's peer id answers there, then close it;
- it dials back whatever peer id the request names: we answer only for the asking peer.
Every node serves, not only public ones: a dial-back from behind a NAT goes out through it,
so its answer is as good, and a mesh with few public nodes still gets enough votes.
"""

from __future__ import annotations

import logging
import time

import multiaddr
import trio
from . import libp2p_loader  # noqa: F401  before any libp2p import (see there)
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID, AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from . import addrs as addr_policy
from .reachability import ERROR, FAILED, OK, REFUSED, Reachability
from .refusals import REFUSALS

log = logging.getLogger("synord.autonat")

DIALBACK_TIMEOUT_S = 5.0  # per address, server side
QUERY_TIMEOUT_S = 20.0  # client side: a server may try a few addresses
MAX_DIALBACK_ADDRS = 4  # a request naming more gets the first ones tried
MAX_REQUEST = 8 * 1024
IDENTIFY_GRACE_S = 1.0

_RESULTS = {int(Message.OK): OK, int(Message.E_DIAL_ERROR): FAILED,
            int(Message.E_DIAL_REFUSED): REFUSED}


def local_port(conn) -> int | None:
    """Our side's TCP port of a libp2p connection (py-libp2p has no accessor for it)."""
    obj, seen = conn, 0
    while obj is not None and seen < 8:
        sock = getattr(obj, "socket", None)
        if sock is not None and hasattr(sock, "getsockname"):
            try:
                return int(sock.getsockname()[1])
            except (OSError, IndexError, TypeError, ValueError):
                return None
        obj = next((getattr(obj, a) for a in ("muxed_conn", "secured_conn", "conn", "stream")
                    if getattr(obj, a, None) is not None), None)
        seen += 1
    return None


class AutoNAT(AutoNATService):
    def __init__(self, mesh, state: Reachability):
        super().__init__(mesh.host, serve=False)
        self.mesh = mesh
        self.state = state
        self.served = 0
        self._connected = trio.Event()
        mesh.host.set_stream_handler(AUTONAT_PROTOCOL_ID, self.handle_stream)
        self._watch_observations()

    # ---- identify's observed addresses -> state
    def _watch_observations(self) -> None:
        mgr = getattr(self.host, "_observed_addr_manager", None)
        if mgr is None:
            return
        record = mgr.record_observation

        def recording(conn, observed, listen_addrs):
            try:
                peer = conn.muxed_conn.peer_id.to_base58()
                self.state.observe(peer, str(observed), local_port(conn))
            except Exception as exc:  # an observation we cannot place: not ours to fail on
                log.debug("observation: %s", exc)
            return record(conn, observed, listen_addrs)

        mgr.record_observation = recording

    # ---- server
    async def handle_stream(self, stream) -> None:
        asker = stream.muxed_conn.peer_id
        try:
            with trio.fail_after(QUERY_TIMEOUT_S):
                raw = await read_varint_prefixed_bytes_limited(stream, MAX_REQUEST)
                request = Message()
                request.ParseFromString(raw)
                if request.type != Message.DIAL or request.dial.peer.id != asker.to_bytes():
                    REFUSALS.count("autonat", "bad-request")
                    response = _refusal(Message.E_BAD_REQUEST, "dial back the asking peer only")
                else:
                    del request.dial.peer.addrs[MAX_DIALBACK_ADDRS:]
                    response = await self._handle_request(
                        request, self._observed_ip(stream), _relayed(stream))
                    self.served += 1
                await stream.write(encode_varint_prefixed(response.SerializeToString()))
        except Exception as exc:  # a hostile or broken asker: nothing to answer
            REFUSALS.count("autonat", "unreadable-request")
            log.debug("autonat request from %s: %s", asker, exc)
        finally:
            try:
                await stream.close()
            except Exception:
                pass

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        """Dial every candidate at once on a fresh connection; the first that completes the
        Noise handshake as ``peer_id`` wins (the asker is reachable there)."""
        won: list[bytes] = []
        async with trio.open_nursery() as nursery:
            for raw in addrs:
                nursery.start_soon(self._dial_back, peer_id, raw, won, nursery.cancel_scope)
        return won[0] if won else None

    async def _dial_back(self, peer_id: ID, raw: bytes, won: list, scope) -> None:
        network = self.host.get_network()
        try:
            maddr = multiaddr.Multiaddr(raw)
        except Exception:
            return
        text = str(maddr)
        if not addr_policy.dialable(text) or "/tcp/" not in text:
            return
        kind = addr_policy.scope(text)
        self.mesh.dials[kind] = self.mesh.dials.get(kind, 0) + 1
        log.debug("dial %s (autonat dial-back)", text)
        with trio.move_on_after(DIALBACK_TIMEOUT_S):
            try:
                transport = network.transport_manager.transport_for_dialing(maddr)
                conn = await transport.dial(maddr)
                try:
                    secured = await network.upgrader.upgrade_security(conn, True, peer_id)
                    await secured.close()
                    won.append(bytes(raw))
                    scope.cancel()
                finally:
                    with trio.CancelScope(shield=True):
                        await conn.close()
            except Exception as exc:
                log.debug("autonat dial-back %s: %s", text, exc)

    # ---- client
    def our_addrs_for(self, server_ip: str | None) -> list[str]:
        mine = [a.split("/p2p/")[0] for a in self.mesh.listen_addrs()]
        return addr_policy.tell(list(dict.fromkeys(mine + self.state.observed_addrs())), server_ip)

    async def ask(self, server: str) -> None:
        now = time.time()
        ours = self.our_addrs_for(self.mesh.seen_at(server))
        try:
            status, addr = await self.query_server(
                ID.from_base58(server), [multiaddr.Multiaddr(a).to_bytes() for a in ours],
                timeout=QUERY_TIMEOUT_S)
        except BaseException as exc:
            if isinstance(exc, trio.Cancelled):
                raise
            self.state.record(server, ERROR, now, f"{type(exc).__name__}: {exc}")
            return
        detail = ""
        if addr:
            try:
                detail = str(multiaddr.Multiaddr(addr))
            except Exception:
                detail = ""
        self.state.record(server, _RESULTS.get(status, ERROR), now, detail or f"status {status}")

    def servers(self) -> dict[str, str | None]:
        """Connected peers that speak AutoNAT -> the IP we see each at."""
        store = self.host.get_peerstore()
        out = {}
        for pid in self.host.get_connected_peers():
            try:
                if not store.supports_protocols(pid, [str(AUTONAT_PROTOCOL_ID)]):
                    continue
            except Exception:
                continue
            out[pid.to_base58()] = self.mesh.seen_at(pid.to_base58())
        return out

    def peer_connected(self) -> None:
        """A new connection may be a new server: plan again (after identify)."""
        self._connected.set()

    async def run(self) -> None:
        # sleeps until a round is due or a peer connects: no polling on an idle node
        while True:
            picked = self.state.plan(self.servers(), time.time())
            if picked:
                async with trio.open_nursery() as nursery:
                    for server in picked:
                        nursery.start_soon(self.ask, server)
                log.info("reachability %s (%s)", self.state.status(time.time()),
                         ", ".join(f"{v.server[:12]} {v.result}"
                                   for v in self.state.votes.values()))
                # [dht] mode = auto follows it: server when public, client behind NAT
                await self.mesh.set_reachability(self.state.status(time.time()))
            with trio.move_on_after(self.state.wait_s(time.time())):
                await self._connected.wait()
            if self._connected.is_set():
                self._connected = trio.Event()
                await trio.sleep(IDENTIFY_GRACE_S)  # its protocols are known after identify


def _refusal(status, text: str) -> Message:
    response = Message()
    response.type = Message.DIAL_RESPONSE
    response.dialResponse.status = status
    response.dialResponse.statusText = text
    return response


def _relayed(stream) -> bool:
    try:
        return any("/p2p-circuit" in str(a) for a in stream.muxed_conn.get_transport_addresses())
    except Exception:
        return True  # cannot tell: as the library, refuse rather than dial for a relayed asker
