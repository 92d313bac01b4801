"""Node assembly: one trio nursery tree rooted at `Node.run`.

    Node.run
    ├── control API (hypercorn)          api.serve
    ├── capability refresh                _refresh_profile
    ├── mesh (libp2p, gossip, discovery)  mesh_service.MeshService.run
    ├── market + jobs                      market.service, jobs.provider, jobs.consumer
    ├── contributor policy                 contributor.Contributor (usage, policy watch)
    ├── sd_notify watchdog                 _watchdog
    └── signal watcher                     SIGTERM/SIGINT -> graceful stop

Stopping the node is cancelling that nursery; every component cleans up in
its own `finally`/`async with`. The Node assembles; the API's operations live
in the components it assembles (`contributor`, `jobs`, `market`, `mesh`) and
synord.api routes to them. Heavy imports (libp2p, hwprobe, runtimes)
happen here, never in the CLI's import path.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import trio

from synord.protocols.identity import Identity, load as load_identity

from . import __version__
from .api import serve as serve_api
from .config import Config
from .contributor import Contributor
from .home import Home
from .sdnotify import Notifier, scrub_environment
from .storage_health import StorageHealth
from .store import Store

log = logging.getLogger("synord.daemon")


@dataclass
class DaemonOptions:
    listen: list[str] | None = None
    bootstrap: list[str] | None = None
    api: str | None = None
    mdns: bool | None = None

    def apply(self, cfg: Config) -> None:
        if self.listen:
            cfg.set("node.listen", list(self.listen))
        if self.bootstrap:
            cfg.set("node.bootstrap", list(self.bootstrap))
        if self.api:
            cfg.set("api.listen", self.api)
        if self.mdns is not None:
            cfg.set("node.mdns", self.mdns)


class StartupError(Exception):
    """A start-up mistake the host admin fixes in one setting: one line, no traceback."""


def _find(exc: BaseException, kinds) -> BaseException | None:
    """The first exception of ``kinds`` in ``exc`` or its (nested) exception groups."""
    if isinstance(exc, kinds):
        return exc
    for sub in getattr(exc, "exceptions", ()):
        found = _find(sub, kinds)
        if found is not None:
            return found
    return None


def lock_home(home: Home) -> int:
    """One daemon per home: an flock on home/daemon.lock, held (and the fd kept,
    not inherited by children) for the life of the process; the file names the holder."""
    import fcntl
    import tempfile
    where = f"home {home.path} (--home / SYNORD_HOME)"
    try:
        with tempfile.TemporaryFile(dir=home.path):
            pass  # api.json, api.token and the state store are written here
        fd = os.open(home.path / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StartupError(f"{where}: not writable: {(exc.strerror or str(exc)).lower()}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StartupError(f"{where}: another daemon runs on this home (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class Node:
    def __init__(self, home: Home, config: Config):
        self.home = home
        self.config = config
        self.identity: Identity = load_identity(home.identity)
        self.store = Store(home.db, check_integrity=True)
        self.storage = StorageHealth(home.path, config["storage.min_free_bytes"],
                                     probe=lambda: self.store.kv_set("storage_probe", time.time()),
                                     on_change=self._storage_changed)
        self.store.on_failure = self.storage.failed
        if self.store.was_empty:
            note = f"{home.db} was empty at start: a fresh store was created (earlier jobs and ledger are gone)"
            log.warning("empty state store", extra={"path": str(home.db)})
            self.storage.notes.append(note)
        self.cache = None  # blobcache.BlobCache once the jobs components exist
        self.started_at = time.time()
        self.notifier = Notifier()
        scrub_environment()  # children must not inherit NOTIFY_SOCKET / WATCHDOG_*
        self.api_url: str | None = None
        self.metrics_url: str | None = None  # the token-less /metrics listener, when configured
        self.profile = None  # hwprobe.CapabilityProfile once probed
        self.mesh = None  # MeshService once started
        self.relay = None  # synord.relay.RelayService once the mesh runs
        self.market = None  # MarketService
        self.provider_jobs = None  # ProviderJobs
        self.gpu = None  # synord.gpu_devices.GpuNode
        self.consumer_jobs = None  # ConsumerJobs
        self.jobs = None  # jobs.local.LocalJobs: both sides, as the API sees them
        self.contributor = Contributor(self)  # the owner's policy: limits, pause, the decision
        self.runtimes: dict = {}  # kind -> Runtime, those available and enabled here
        from .metrics import registry_for
        self.metrics_registry = registry_for(self)
        self._stopping = trio.Event()
        self._outer: trio.Nursery | None = None  # outlives the components: the container reaper
        self._reaper = None  # synord.runtimes.anchored.AnchoredProcess
        # Awaited in order on graceful stop (jobs hand their tasks back first).
        self._stop_hooks: list = []

    # ---- lifecycle -------------------------------------------------------------

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        token = self.home.ensure_token()
        try:
            async with trio.open_nursery() as outer:
                self._outer = outer
                try:
                    await self._run_components(token, task_status)
                finally:
                    with trio.CancelScope(shield=True):
                        await self._stop_reaper()
        finally:
            if self.api_url is not None:  # ours to remove only if we wrote it
                self.home.api_json.unlink(missing_ok=True)
            self.store.close()
            log.info("stopped")

    async def _run_components(self, token: str, task_status) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_signals, nursery.cancel_scope)
            nursery.start_soon(self._watch_storage)
            await self._probe()
            nursery.start_soon(self._refresh_profile)
            await self._start_components(nursery)
            api_url = await self._listen(nursery, "api.listen", serve_api, token)
            if self.config["metrics.listen"]:
                from .metrics import serve as serve_metrics
                self.metrics_url = await self._listen(nursery, "metrics.listen", serve_metrics)
            self.api_url = api_url
            self.home.write_api_json(self.api_url)
            log.info("ready", extra={"peer_id": self.identity.peer_id, "api": self.api_url,
                                     "version": __version__})
            self.notifier.ready(f"peer {self.identity.peer_id}")
            if self.notifier.watchdog_interval_s:
                nursery.start_soon(self._watchdog)
            task_status.started(self)
            await self._stopping.wait()
            self.notifier.stopping()
            log.info("stopping")
            await self._graceful_stop()
            nursery.cancel_scope.cancel()

    async def _listen(self, nursery: trio.Nursery, setting: str, serve, *args) -> str:
        """Start a listener on the address in ``setting``; a busy port: one line naming it."""
        listen = self.config[setting]
        try:
            return await nursery.start(serve, self, listen, *args)
        except BaseException as exc:
            err = _find(exc, OSError)
            if err is None:
                raise
            raise StartupError(f"{setting} {listen}: {(err.strerror or str(err)).lower()}") from None

    async def _start_reaper(self) -> None:
        """Containers must not outlive us (synord.runtimes.reaper): sweep what a previous
        life left, then keep a reaper that sweeps again if we die."""
        from synord.runtimes import reaper
        registry = self.home.path / "containers"
        swept = await trio.to_thread.run_sync(reaper.sweep, registry)
        if swept:
            log.warning("removed containers a previous run left behind", extra={"count": len(swept)})
        assert self._outer is not None
        self._reaper = await reaper.start(self._outer, registry)
        self.runtimes["container"].registry = registry

    async def _stop_reaper(self) -> None:
        if self._reaper is None:
            return
        self._reaper.popen.send_signal(signal.SIGTERM)  # it sweeps (nothing, normally) and exits
        with trio.move_on_after(30):
            await self._reaper.wait()
        if self._reaper.returncode is None:
            self._reaper.kill_group()
            await self._reaper.wait()
        await self._reaper.aclose()

    def request_stop(self) -> None:
        self._stopping.set()

    async def _watch_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if self._stopping.is_set():
                    log.warning("second signal: stopping now")
                    scope.cancel()
                    return
                log.info("signal received", extra={"signal": signal.Signals(signum).name})
                self.request_stop()

    async def _graceful_stop(self) -> None:
        """Hand running work back before the nursery is cancelled (bounded by a deadline)."""
        with trio.move_on_after(self.config["jobs.preemption_grace_s"]):
            for hook in self._stop_hooks:
                await hook()

    async def _watchdog(self) -> None:
        while True:
            self.notifier.watchdog()
            await trio.sleep(self.notifier.watchdog_interval_s)

    async def _start_components(self, nursery: trio.Nursery) -> None:
        """Start the mesh, market and jobs components (each owns its own tasks)."""
        from synord.runtimes import get_runtime

        from .jobs.consumer import ConsumerJobs
        from .jobs.provider import ProviderJobs
        from .market.pricing import PricingPolicy
        from .market.service import MarketService
        from .mesh_service import MeshService
        from synord.protocols.streamlimits import StreamLimits
        from synord import hwprobe

        c = self.config
        self.mesh = MeshService(
            self.identity, c["node.listen"], c["node.bootstrap"], mdns=c["node.mdns"],
            profile_provider=lambda: self.profile.to_json() if self.profile is not None else None,
            announce_interval_s=c["node.announce_interval_s"],
            streams=StreamLimits(**c.values["streams"]), dht=c["dht.mode"],
            peer_exchange=c["node.peer_exchange"])
        await nursery.start(self.mesh.run)
        if hasattr(self.mesh.mesh, "host"):  # libp2p: circuit relay + hole punching (synord.relay)
            from .relay import RelayService, RelaySettings
            self.relay = RelayService(self.mesh.mesh, RelaySettings.from_config(c.values["relay"]))
            await nursery.start(self.relay.run)

        self.runtimes = {kind: get_runtime(kind) for kind, av in self.profile.runtimes.items()
                         if av.get("available") and kind in c["runtimes.enabled"]}
        if "container" in self.runtimes:
            await self._start_reaper()
        policy = PricingPolicy(
            electricity_per_kwh=c["pricing.electricity_per_kwh"], watts_per_core=c["pricing.watts_per_core"],
            watts_per_gpu=c["pricing.watts_per_gpu"],
            depreciation_per_core_hour=c["pricing.depreciation_per_core_hour"],
            depreciation_per_gpu_hour=c["pricing.depreciation_per_gpu_hour"], margin=c["pricing.margin"],
            protocol_fee=c["pricing.protocol_fee"], preemptible_discount=c["pricing.preemptible_discount"],
            region=c["node.region"] or None)
        from .gpu_devices import GpuNode
        self.gpu = GpuNode(self.store, self.gpu_units, c["gpu.cdi_dirs"], c["gpu.dev_root"],
                           c["gpu.meter_interval_s"], vfio_units=self.vfio_units)
        self.gpu.allocator.release_all()  # a previous life's tasks are gone: so is their hold on GPUs
        await nursery.start(self.gpu.meter.run)
        self.market = MarketService(
            self.identity, self.store, self.mesh.mesh, offer=self.contributor.market_offer,
            # The market checks pause/enable itself; every other reason comes in the offer.
            contributing=lambda: self.config["contributor.enabled"] and not self.contributor.paused,
            policy=policy,
            # Order topics are per kind ("gpu"; the model is the order's gpu_class): any node may bid.
            classes=lambda: sorted({c.split(".")[0] for c in hwprobe.resource_classes(self.profile)} | {"gpu"}),
            preemptible=c["contributor.preemptible"], min_price=c["pricing.min_price"],
            allow_peers=c["market.allow_peers"], deny_peers=c["market.deny_peers"],
            on_agreement=lambda terms: self.provider_jobs.agreement_made(terms),
            max_price=c["market.max_price"], spend_cap=c["market.spend_cap"],
            spend_period_s=c["market.spend_period_s"], max_asks_per_peer=c["market.max_asks_per_peer"],
            candidates_per_peer=c["market.candidates_per_peer"],
            parallel_proposals=c["market.parallel_proposals"], hedge_s=c["market.hedge_s"],
            backoff_s=c["market.backoff_s"], devices=self.gpu.allocator)
        self.provider_jobs = ProviderJobs(
            self.identity, self.store, self.home, self.runtimes,
            on_finished=self._task_finished,
            heartbeat_s=c["jobs.heartbeat_interval_s"], preemption_grace_s=c["jobs.preemption_grace_s"])
        self.provider_jobs.gpu = self.gpu
        self.provider_jobs.services.volumes.quota_bytes = c["storage.volume_quota_bytes"]
        self.provider_jobs.services.on_period = self.market.provider_bill_period
        self.provider_jobs.forward_limits = {"max_per_job": c["forward.max_connections_per_job"],
                                             "idle_s": c["forward.idle_s"]}
        self.market.provider.displacer = self.provider_jobs  # priorities on a full provider
        self.provider_jobs.register(self.mesh.mesh)
        await nursery.start(self.provider_jobs.run)
        await nursery.start(self.market.run)
        self.consumer_jobs = ConsumerJobs(
            self.identity, self.store, self.home, self.mesh.mesh, self.market,
            lease_timeout_s=c["jobs.lease_timeout_s"], checkpoint_interval_s=c["jobs.checkpoint_interval_s"],
            placement_timeout_s=c["jobs.placement_timeout_s"])
        from .blobcache import BlobCache
        from .jobs.local import LocalJobs
        self.jobs = LocalJobs(self.consumer_jobs, self.provider_jobs, self.storage, self.mesh.mesh, self.identity)
        from .jobs.forward_client import ConsumerForwards
        self.jobs.forwards = ConsumerForwards(self.consumer_jobs, self.mesh.mesh, self.identity,
                                              c["forward.max_connections_per_job"], c["forward.idle_s"])
        await nursery.start(self.jobs.forwards.run)
        self.cache = BlobCache(self.provider_jobs.blobs, c["storage.cache_max_bytes"], self.jobs.pinned_blobs)
        self.provider_jobs.storage = self.consumer_jobs.storage = self.storage
        self.provider_jobs.cache = self.cache
        await nursery.start(self.consumer_jobs.run)
        from synord.protocols.pacing import PACER
        PACER.rate = self.contributor.limits().bandwidth_bytes_per_s  # one cap for every transfer
        nursery.start_soon(self.contributor.measure_usage)
        nursery.start_soon(self.contributor.watch_policy)
        from .history import run_sampler
        nursery.start_soon(run_sampler, self)
        self._stop_hooks.append(self.contributor.hand_back_on_stop)

    def _task_finished(self, terms, outcome: str, usage) -> None:
        if terms.devices:  # the receipt with its GPU totals, then the devices are free
            self.gpu.settle(terms, outcome, usage, self.market.provider_settle)
        else:
            self.market.provider_settle(terms, usage.cpu_s, usage.peak_memory_bytes, outcome,
                                        started=self.provider_jobs.services.billed_until_aid(terms.aid))

    def gpu_units(self) -> list[dict]:
        """This host's GPUs as allocatable units (synord.hwprobe.gpu_units)."""
        from synord.hwprobe.gpu_units import gpu_units
        return gpu_units(self.profile.devices, self.profile.sysfs_root) if self.profile is not None else []

    def vfio_units(self) -> list[dict]:
        """GPUs bound to vfio-pci that a microVM here can take (synord.runtimes.vfio)."""
        if "microvm" not in self.runtimes or self.runtimes["microvm"].passthrough_unavailable():
            return []
        from synord.hwprobe.gpu_units import vfio_units
        from synord.runtimes import vfio
        return vfio_units(vfio.passthrough_gpus(self.config["gpu.sysfs_root"])[0])

    # ---- storage -----------------------------------------------------------------------

    async def _watch_storage(self) -> None:
        """Free space and the cache limit, every second near the floor (less often with
        room to spare): evict what is unused, say when full."""
        while True:
            self.storage.check()
            if self.cache is not None:
                self.cache.make_room(0, self.storage.free_bytes, self.storage.min_free_bytes)
            await trio.sleep(self.storage.next_check_s())

    def _storage_changed(self, ok: bool) -> None:
        if self.market is not None:
            self.market.offer_changed()  # withdraw the asks now / publish them again

    def storage_json(self) -> dict[str, Any]:
        out = self.storage.to_json()
        if self.cache is not None:
            out["cache"] = {"bytes": self.cache.used_bytes(), "max_bytes": self.cache.max_bytes,
                            "evicted": self.cache.evicted}
        return out

    def doctor_json(self) -> dict[str, Any]:
        """`synord doctor`: a list of checks, each ok or not with the reason and what to do."""
        st = self.storage
        checks = [
            {"name": "storage", "ok": st.ok, "reason": st.reason, "free_bytes": st.free_bytes},
            {"name": "state_store", "ok": not st.notes, "reason": "; ".join(st.notes) or None},
        ]
        if self.cache is not None:
            used = self.cache.used_bytes()
            checks.append({"name": "blob_cache", "ok": used <= self.cache.max_bytes,
                           "reason": None if used <= self.cache.max_bytes else
                           f"{used} bytes in use by running tasks, over the limit of {self.cache.max_bytes}"})
        for kind, av in sorted((self.profile.runtimes if self.profile else {}).items()):
            checks.append({"name": f"runtime.{kind}", "ok": bool(av.get("available")),
                           "reason": av.get("reason")})
        network = self.mesh.mesh.reachability_json() if self.mesh else {}
        if self.mesh:
            from synord.netdoctor import network_checks
            checks += network_checks(network)  # they explain; they do not fail the doctor
        return {"ok": all(c["ok"] for c in checks
                          if not c["name"].startswith(("runtime.", "network."))),
                "checks": checks, "network": network}

    # ---- capability profile ------------------------------------------------------

    async def _probe(self, bench: bool = False):
        """Probe in a child process: vendor libraries (PoCL's LLVM, NVML, ...) cost
        ~80 MiB and can crash; neither should stay in the daemon."""
        import json
        import sys

        from synord import hwprobe
        from synord.runtimes import available_all
        from synord.runtimes.base import child_env

        res = await trio.run_process([sys.executable, "-m", "synord.hwprobe", "--json"]
                                     + (["--bench"] if bench else []),
                                     capture_stdout=True, capture_stderr=True, check=False,
                                     env=child_env())
        if res.returncode != 0:
            raise RuntimeError("hardware probe failed: "
                               + res.stderr.decode(errors="replace").strip()[-500:])
        profile = hwprobe.CapabilityProfile.from_json(json.loads(res.stdout))
        profile.runtimes = available_all(self.config["runtimes.enabled"])
        if "microvm" in self.config["runtimes.enabled"]:  # the microVM's GPU answer from [gpu] sysfs_root
            from synord.runtimes import vfio
            vfio.annotate(profile.runtimes, self.config["gpu.sysfs_root"])
        profile.limits = self.contributor.limits().to_json()
        # Signals and the offer under our contributor limits (cheap, in-process).
        profile = await trio.to_thread.run_sync(hwprobe.refresh_dynamic, profile)
        if not bench:
            self.profile = profile
        return profile

    async def _refresh_profile(self) -> None:
        from synord import hwprobe
        while True:
            # load and free memory move with our own tasks: every 5 s while one runs,
            # every 15 s idle (4 ms of CPU each; preference changes refresh at once)
            busy = self.provider_jobs is not None and self.provider_jobs.running()
            await trio.sleep(5 if busy else 15)
            profile = await trio.to_thread.run_sync(hwprobe.refresh_dynamic, self.profile)
            self.profile = profile
            profile.offerable = self.contributor.offerable()  # what `probe` shows and peers hear agrees too

    # ---- API surface ---------------------------------------------------------------

    def listen_addrs(self) -> list[str]:
        return self.mesh.listen_addrs() if self.mesh else []

    def status_json(self) -> dict[str, Any]:
        decision = self.contributor.contribution()
        return {
            "peer_id": self.identity.peer_id,
            "addrs": self.listen_addrs(),
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 3),
            "peers": len(self.mesh.peers_json()) if self.mesh else 0,
            "contributing": decision.contributing,
            "why_not": decision.why_not,
            "paused": self.contributor.paused,
            "running_tasks": len(self.provider_jobs.running()) if self.provider_jobs else 0,
            "api": self.api_url,
            "metrics": self.metrics_url,
            "home": str(self.home.path),
            "storage": self.storage_json(),
            "dht": self.mesh.mesh.dht_json() if self.mesh else {"mode": "off"},
            "relay": self.relay.status_json() if self.relay else None,
            "reachability": self.mesh.mesh.reachability_json() if self.mesh else {
                "status": "unknown", "observed_addrs": [], "relays": []},
        }

    async def probe_json(self, bench: bool = False) -> dict:
        if bench:
            return (await self._probe(bench=True)).to_json()
        return self.profile.to_json()



def run(home: Home, config: Config) -> int:
    """Run the node until it stops; 0 after a graceful stop, 1 after a failure.
    A start-up mistake (home in use or unwritable, busy or foreign address) exits
    with one line naming the setting, before api.json is written."""
    from synord.protocols.mesh import MeshError
    try:
        lock = lock_home(home)
    except StartupError as exc:
        raise SystemExit(f"synord: {exc}") from None
    try:
        node = Node(home, config)
    except Exception as exc:  # unusable identity or state store: say why, no traceback
        log.error("cannot start", extra={"error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(f"synord: cannot start: {exc}") from None
    try:
        trio.run(node.run)
    except Exception as exc:
        err = _find(exc, (StartupError, MeshError))
        if err is not None and node.api_url is None:
            log.error("cannot start", extra={"error": str(err)})
            raise SystemExit(f"synord: {err}") from None
        log.exception("daemon failed")
        return 1
    finally:
        os.close(lock)
    return 0
