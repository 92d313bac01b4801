"""Import py-libp2p without loading the features a daemon does not use.

py-libp2p 0.8.1 imports every transport and feature it has as soon as any part
of it is imported: its package ``__init__``s (``libp2p``, ``libp2p.transport``,
``libp2p.security``, ...) pull in QUIC and aioquic, TLS, WebSocket, secio,
mplex, persistent peerstores; ``BasicHost``'s module imports mDNS (zeroconf),
UPnP and AutoTLS (ACME: requests, httpx, dnspython) at the top; ``Swarm``'s
imports multiaddr's DNS resolver (dnspython, which imports aioquic for DNS over
QUIC).  ``import libp2p`` alone made a process 57 MiB bigger
(bench/bench_idle.py, bench/README.md).  A daemon uses TCP, Noise, yamux,
GossipSub, identify, ping, AutoNAT, circuit relay + DCUtR and the Kademlia DHT.

Importing this module before any other libp2p import *defers* the modules in
``DEFERRED``: their code runs when first needed instead of at import.

* A deferred package's ``__init__`` runs at the first lookup of a name it alone
  defines (``from libp2p import new_host``); importing its submodules does not
  run it.
* A deferred module runs at the first lookup of any other name than its
  *stand-ins*: the names other modules import from it at their top, which are
  only called when the feature is used (``create_mdns_discovery`` with
  ``[node] mdns`` on, ``ACMEClient`` with AutoTLS).  Calling a stand-in runs
  the module and calls the real thing.  ``DNSResolver()`` (every ``Swarm``
  makes one) gives an object that loads dnspython at its first use, i.e. when a
  ``/dns`` address is resolved.  RSA and secp256k1 keys (pycryptodome,
  coincurve) load when a peer with such an identity shows up; a pre-shared key
  network's cipher (pycryptodome) never, as we set no PSK.

Only for the pinned py-libp2p version (its modules were read for what the
stand-ins must do: none is used in an ``isinstance`` or an ``except``); with
any other version, or when libp2p was imported before us, nothing is deferred
and ``new_host`` is py-libp2p's.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
import types
from pathlib import Path

PINNED_VERSION = "0.8.1"

# module -> its stand-ins (names other modules take from it at import time)
DEFERRED: dict[str, tuple[str, ...]] = {
    # packages whose __init__ re-exports (and so imports) every transport and feature
    "libp2p": (),
    "libp2p.transport": (),
    "libp2p.security": (),
    "libp2p.security.tls": (),
    "libp2p.network": (),
    "libp2p.discovery.mdns": (),
    "libp2p.bitswap": (),  # the DHT takes only its CID helpers (bitswap.cid)
    # mDNS (zeroconf), UPnP, AutoTLS (requests, httpx, dnspython): BasicHost imports them
    "libp2p.discovery.mdns.mdns": ("MDNSDiscovery", "create_mdns_discovery"),
    "libp2p.discovery.upnp.upnp": ("UpnpManager",),
    "libp2p.security.tls.autotls.acme": ("ACMEClient", "compute_b36_peer_id"),
    "libp2p.security.tls.autotls.broker": ("BrokerClient",),
    # /dns addresses (dnspython, which imports aioquic for DNS over QUIC): Swarm's import
    "multiaddr.resolvers": ("DNSResolver",),
    # QUIC (aioquic): custom_types names QUICStream in a type alias
    "libp2p.transport.quic.stream": ("QUICStream",),
    # RSA (pycryptodome) and secp256k1 (coincurve) keys: only for a peer with such an identity
    "libp2p.crypto.rsa": ("RSAPublicKey", "RSAPrivateKey"),
    "libp2p.crypto.secp256k1": ("Secp256k1PublicKey", "Secp256k1PrivateKey"),
    # pre-shared-key private networks (pycryptodome's Salsa20): we set no PSK
    "libp2p.security.pnet.psk_conn": ("PskConn",),
}


class _Deferred(types.ModuleType):
    """A module whose code has not run yet (see the module docstring)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if self.__spec__.submodule_search_locations is not None:
            try:  # a submodule not imported yet (``from libp2p.kad_dht import common``)
                return importlib.import_module(f"{self.__name__}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{self.__name__}.{name}":
                    raise
        _run(self)
        return getattr(self, name)


_RUN_LOCK = threading.RLock()  # a stand-in may first be called from a worker thread


def _run(module: types.ModuleType) -> types.ModuleType:
    """Run a deferred module's own code (once); its real names replace the stand-ins."""
    with _RUN_LOCK:
        if isinstance(module, _Deferred):
            module.__class__ = types.ModuleType
            module.__spec__.loader.real.exec_module(module)
    return module


class _StandIn(type):
    """The type of stand-ins: a class attribute taken at import time (serialization's
    ``RSAPublicKey.from_bytes``) is a method that runs the module when called."""

    def __getattr__(cls, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def deferred(*args, **kwargs):
            return getattr(getattr(_run(cls._synord_module), cls.__name__), attr)(*args, **kwargs)
        return deferred


def _stand_in(module: types.ModuleType, name: str) -> type:
    def __new__(cls, *args, **kwargs):
        return getattr(_run(module), name)(*args, **kwargs)
    return _StandIn(name, (), {"__new__": __new__, "__module__": module.__name__, "_synord_module": module,
                               "__doc__": f"{module.__name__}.{name}, loaded when first called"})


class _LazyDNSResolver:
    """multiaddr's ``DNSResolver()``: dnspython is loaded when it first resolves."""

    def __init__(self, module: types.ModuleType) -> None:
        self._module = module

    def __getattr__(self, name: str):
        real = self.__dict__.get("_real")
        if real is None:
            real = self._real = _run(self._module).DNSResolver()
        return getattr(real, name)


class _DeferLoader(importlib.abc.Loader):
    def __init__(self, real: importlib.abc.Loader) -> None:
        self.real = real

    def create_module(self, spec):
        return None  # the default module object

    def __getattr__(self, name: str):  # get_filename, get_resource_reader, ...
        return getattr(self.real, name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__class__ = _Deferred
        for name in DEFERRED[module.__name__]:
            if name == "DNSResolver":
                setattr(module, name, lambda m=module: _LazyDNSResolver(m))
            else:
                setattr(module, name, _stand_in(module, name))


class _DeferFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in DEFERRED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _DeferLoader(spec.loader)
        return spec


def _is_pinned_version() -> bool:
    # the installed distribution's metadata directory (importlib.metadata costs ~1 MiB)
    spec = importlib.machinery.PathFinder.find_spec("libp2p")
    if spec is None or not spec.submodule_search_locations:
        return False
    site = Path(spec.submodule_search_locations[0]).parent
    return (site / f"libp2p-{PINNED_VERSION}.dist-info").is_dir()


def install() -> bool:
    """Defer ``DEFERRED`` if libp2p is the pinned version and none of them is imported
    yet.  Returns whether deferring is in effect."""
    if any(isinstance(f, _DeferFinder) for f in sys.meta_path):
        return True
    if any(name in sys.modules for name in DEFERRED):
        return False  # imported the ordinary way already: nothing left to save
    if not _is_pinned_version():
        return False
    sys.meta_path.insert(0, _DeferFinder())
    return True


ACTIVE = install()


def new_host(*, key_pair, sec_opt, muxer_opt, listen_addrs, connection_config, addrs_factory,
             enable_mDNS=False):
    """``libp2p.new_host`` for what a daemon asks of it (explicit key, security and muxer
    options, TCP listen addresses, no mDNS/UPnP/QUIC/metrics), built from the same parts
    without importing ``libp2p/__init__`` (which imports every transport).
    tests/test_libp2p_loader.py compares the two hosts part by part."""
    tcp_only = all({p.name for p in a.protocols()} & {"tcp", "ws", "wss"} == {"tcp"}
                   for a in listen_addrs)
    if not ACTIVE or not tcp_only or enable_mDNS:
        from libp2p import new_host as upstream
        return upstream(key_pair=key_pair, sec_opt=sec_opt, muxer_opt=muxer_opt,
                        listen_addrs=listen_addrs, enable_mDNS=enable_mDNS,
                        connection_config=connection_config, addrs_factory=addrs_factory)
    from libp2p.host.basic_host import BasicHost
    from libp2p.network.swarm import Swarm
    from libp2p.peer.id import ID
    from libp2p.peer.peerstore import PeerStore
    from libp2p.rcmgr import new_resource_manager
    from libp2p.transport.manager import TransportManager
    from libp2p.transport.tcp.tcp import TCP
    from libp2p.transport.upgrader import TransportUpgrader

    resource_manager = new_resource_manager()
    peer_id = ID.from_pubkey(key_pair.public_key)
    peerstore = PeerStore()
    peerstore.add_key_pair(peer_id, key_pair)
    upgrader = TransportUpgrader(secure_transports_by_protocol=sec_opt,
                                 muxer_transports_by_protocol=muxer_opt)
    swarm = Swarm(peer_id, peerstore, upgrader, transports=[TCP()], retry_config=None,
                  connection_config=connection_config, psk=None, metric_send_channel=None,
                  transport_manager=TransportManager(port_demuxers={}))
    swarm.set_resource_manager(resource_manager)
    return BasicHost(network=swarm, enable_mDNS=False, bootstrap=None, enable_upnp=False,
                     negotiate_timeout=30, resource_manager=resource_manager,
                     metric_recv_channel=None, addrs_factory=addrs_factory)
