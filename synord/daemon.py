"""Node assembly: one trio nursery tree rooted at `Node.run`.

    Node.run
    ├── control API (hypercorn)          api.serve
    ├── capability refresh                _refresh_profile
    ├── mesh (libp2p, gossip, discovery)  mesh_service.MeshService.run
    ├── market + jobs                      (components added by later issues)
    ├── sd_notify watchdog                 _watchdog
    └── signal watcher                     SIGTERM/SIGINT -> graceful stop

Stopping the node is cancelling that nursery; every component cleans up in
its own `finally`/`async with`. Heavy imports (libp2p, hwprobe, runtimes)
happen here, never in the CLI's import path.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import trio

from protocols.identity import Identity, load as load_identity
from protocols.refusals import REFUSALS

from . import __version__
from .api import ApiError, serve as serve_api
from .config import Config
from .home import Home
from .sdnotify import Notifier, scrub_environment
from .storage_health import StorageHealth
from .store import Store

log = logging.getLogger("synord.daemon")

SESSION_IDLE_TTL_S = 120.0  # a session idle report counts this long (the tray re-reports every few s)
MAX_GRACE_S = 86400  # a preemption notice longer than a day is not a notice


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
        self.market = None  # MarketService
        self.provider_jobs = None  # ProviderJobs
        self.gpu = None  # synord.gpu_devices.GpuNode
        self.consumer_jobs = None  # ConsumerJobs
        self.consumer_exec = None  # jobs.shell.ConsumerExec, on the first exec
        self.runtimes: dict = {}  # kind -> Runtime, those available and enabled here
        from .metrics import registry_for
        self.metrics_registry = registry_for(self)
        self._stopping = trio.Event()
        self._limits_changed = trio.Event()  # wakes the policy watcher
        self.usage = None  # hwprobe.policy.Usage: task cache size and today's transfers
        self._throttled: dict[str, float] = {}  # job id -> cores its cgroup was last given
        self._session_idle: tuple[float, float] | None = None  # (idle_s, monotonic when reported)
        self._outer: trio.Nursery | None = None  # outlives the components: the container reaper
        self._reaper = None  # runtimes.anchored.AnchoredProcess
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
        """Containers must not outlive us (runtimes.reaper): sweep what a previous
        life left, then keep a reaper that sweeps again if we die."""
        import sys

        from runtimes import reaper
        from runtimes.anchored import spawn
        from runtimes.base import child_env
        registry = self.home.path / "containers"
        swept = await trio.to_thread.run_sync(reaper.sweep, registry)
        if swept:
            log.warning("removed containers a previous run left behind", extra={"count": len(swept)})
        assert self._outer is not None
        self._reaper = await spawn(self._outer, [sys.executable, "-m", "runtimes.reaper", str(registry)],
                                   env=child_env(), death_signal=signal.SIGTERM)
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
        from runtimes.base import get_runtime

        from .jobs.consumer import ConsumerJobs
        from .jobs.provider import ProviderJobs
        from .market.pricing import PricingPolicy
        from .market.service import MarketService
        from .mesh_service import MeshService
        from protocols.streamlimits import StreamLimits
        import hwprobe

        c = self.config
        self.mesh = MeshService(
            self.identity, c["node.listen"], c["node.bootstrap"], mdns=c["node.mdns"],
            profile_provider=lambda: self.profile.to_json() if self.profile is not None else None,
            announce_interval_s=c["node.announce_interval_s"],
            streams=StreamLimits(**c.values["streams"]))
        await nursery.start(self.mesh.run)

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
                           c["gpu.meter_interval_s"])
        self.gpu.allocator.release_all()  # a previous life's tasks are gone: so is their hold on GPUs
        await nursery.start(self.gpu.meter.run)
        self.market = MarketService(
            self.identity, self.store, self.mesh.mesh, offer=self.market_offer,
            # The market checks pause/enable itself; every other reason comes in the offer.
            contributing=lambda: self.config["contributor.enabled"] and not self.paused, policy=policy,
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
        self.provider_jobs.register(self.mesh.mesh)
        await nursery.start(self.provider_jobs.run)
        await nursery.start(self.market.run)
        self.consumer_jobs = ConsumerJobs(
            self.identity, self.store, self.home, self.mesh.mesh, self.market,
            lease_timeout_s=c["jobs.lease_timeout_s"], checkpoint_interval_s=c["jobs.checkpoint_interval_s"],
            placement_timeout_s=c["jobs.placement_timeout_s"])
        from .blobcache import BlobCache
        self.cache = BlobCache(self.provider_jobs.blobs, c["storage.cache_max_bytes"], self.pinned_blobs)
        self.provider_jobs.storage = self.consumer_jobs.storage = self.storage
        self.provider_jobs.cache = self.cache
        await nursery.start(self.consumer_jobs.run)
        from protocols.pacing import PACER
        PACER.rate = self.contributor_limits().bandwidth_bytes_per_s  # one cap for every transfer
        nursery.start_soon(self._measure_usage)
        nursery.start_soon(self._watch_policy)
        from .history import run_sampler
        nursery.start_soon(run_sampler, self)
        self._stop_hooks.append(self._hand_back_on_stop)

    def _task_finished(self, terms, outcome: str, usage) -> None:
        if terms.devices:  # the receipt with its GPU totals, then the devices are free
            self.gpu.settle(terms, outcome, usage, self.market.provider_settle)
        else:
            self.market.provider_settle(terms, usage.cpu_s, usage.peak_memory_bytes, outcome)

    def gpu_units(self) -> list[dict]:
        """This host's GPUs as allocatable units (hwprobe.gpu_units)."""
        from hwprobe.gpu_units import gpu_units
        return gpu_units(self.profile.devices, self.profile.sysfs_root) if self.profile is not None else []

    def market_offer(self) -> dict:
        """What the market may sell now: the contributor's share of this host, and the sandboxes."""
        off = self._offerable()
        host = self.profile.host if self.profile is not None else {}
        if off.get("allowed", True):
            # A stable share (not minus momentary load: that goes in the ask's `load`).
            cpus = float(host.get("effective_cpus") or host.get("logical_cores") or 0)
            off["cpus"] = round(cpus * self.config["contributor.cpu_share"], 2)
        load = (host.get("load") or {}).get("load1")
        off["load"] = min(1.0, load / max(1.0, off.get("cpus") or 1.0)) if load is not None else 0.0
        off["runtimes"] = sorted(self.runtimes)
        units = self.gpu.units() if self.gpu is not None else []  # only what CDI can inject
        if units and off.get("gpus"):  # GPUs by class of unit (MIG instances count one each)
            from .gpu_devices import offer_classes
            allowed = len(units) if off["gpus"] >= len([d for d in self.profile.devices if d.get("kind") == "gpu"]) \
                else off["gpus"]
            off["gpu_classes"] = offer_classes(units, allowed)
            off["gpus"] = sum(c["count"] for c in off["gpu_classes"])
        return off

    def _offerable(self) -> dict:
        """The profile's offer under the one contribution decision (hwprobe.policy.decide)."""
        import hwprobe
        if self.profile is None:
            return {}
        return hwprobe.offerable(self.profile, self.contributor_limits(), self.signals(), self.usage,
                                 decision=self.contribution())

    def signals(self):
        """The last probed contributor signals, with the desktop session's idle time
        (reported by the tray, POST /v1/idle) where the daemon sees none itself."""
        import hwprobe
        sig = hwprobe.ContributorSignals.from_json((self.profile.signals if self.profile else None) or {})
        if sig.hour_of_day is None:  # not probed yet
            sig = hwprobe.read_signals()
        if sig.user_idle_s is None and self._session_idle is not None:
            idle_s, at = self._session_idle
            if time.monotonic() - at < SESSION_IDLE_TTL_S:
                sig.user_idle_s, sig.idle_source = idle_s + (time.monotonic() - at), "session"
        return sig

    def report_idle(self, body: dict) -> dict:
        """The user's session (the tray sees X11/Wayland input) says how long it has been idle."""
        idle = body.get("idle_s")
        if isinstance(idle, bool) or not isinstance(idle, (int, float)) or not 0 <= idle < 10**8:
            raise ApiError(400, "idle_s must be a number of seconds >= 0")
        self._session_idle = (float(idle), time.monotonic())
        self._limits_changed.set()
        return {"idle_s": float(idle), "source": self.signals().idle_source}

    def contribution(self):
        """THE answer to "is this node contributing, and if not why": status, limits,
        the dashboard, the metrics and the asks all read it (hwprobe.policy.decide)."""
        from hwprobe.policy import decide
        d = decide(self.contributor_limits(), self.signals(), self.usage,
                   enabled=self.config["contributor.enabled"], paused=self.paused)
        if self.storage is not None and not self.storage.ok:  # no new work until the disk recovers
            d = dataclasses.replace(d, contributing=False,
                                    reasons=[*d.reasons, f"provider storage full: {self.storage.reason}"])
        return d

    async def _measure_usage(self) -> None:
        """Task cache size and bytes transferred today, for disk_limit_bytes and
        daily_transfer_bytes (a walk of a few directories, off the event loop)."""
        from hwprobe.policy import Usage
        from hwprobe.signals import disk_usage
        h = self.home
        while True:
            t = time.localtime()
            midnight = time.mktime((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0, 0, 0, -1))
            cache, _ = await trio.to_thread.run_sync(disk_usage, [h.work], 0.0)
            blobs, today = await trio.to_thread.run_sync(disk_usage, [h.artifacts, h.checkpoints], midnight)
            was = self.usage
            self.usage = Usage(cache_bytes=cache + blobs, transferred_today_bytes=today)
            if was is None:
                self._limits_changed.set()
            await trio.sleep(5)

    def _apply_throttle(self, throttle: float) -> None:
        """cpu.max of every running container task = its agreed cores x the throttle
        (cpu_time_percent, or 1 % while suspended for other processes' CPU use)."""
        running = self.provider_jobs.running()
        for t in running:
            cg = getattr(t.execution.sandbox, "cgroup", None)
            if cg is None:
                continue  # wasm / microVM: no cgroup of their own (reported by `limits`)
            cores = max(0.01, t.execution.spec.limits.cpus * throttle)
            if self._throttled.get(t.job_id) == cores:
                continue
            try:
                cg.set_cpu(cores)
                self._throttled[t.job_id] = cores
            except OSError:
                pass  # not created yet or already gone: next round
        for job_id in set(self._throttled) - {t.job_id for t in running}:
            del self._throttled[job_id]

    # ---- storage -----------------------------------------------------------------------

    async def _watch_storage(self) -> None:
        """Free space and the cache limit, every second: evict what is unused, say when full."""
        while True:
            self.storage.check()
            if self.cache is not None:
                self.cache.make_room(0, self.storage.free_bytes, self.storage.min_free_bytes)
            await trio.sleep(1.0)

    def _storage_changed(self, ok: bool) -> None:
        if self.market is not None:
            self.market.offer_changed()  # withdraw the asks now / publish them again

    def pinned_blobs(self) -> set[str]:
        """What the blob cache must keep: running and uploaded-for tasks here, and the
        artefacts of our own jobs that may still have to be shipped."""
        ours = {j.spec.get("sha256") for j in self.consumer_jobs.jobs.values()
                if j.state not in ("succeeded", "failed", "cancelled")}
        return self.provider_jobs.pinned_blobs() | ours

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
        return {"ok": all(c["ok"] for c in checks if not c["name"].startswith("runtime.")),
                "checks": checks}

    async def _watch_policy(self) -> None:
        """Contributor limits turning false (user back, battery, hours) preempt running work;
        reasons that only stop new work (network hours, transfer, disk, other CPU use)
        withdraw the asks; the CPU throttle follows the preferences live. An external
        notice file (like a cloud spot notice) preempts too."""
        was_contributing, was_handing_back = True, False
        notice_file = self.home.path / "preempt-notice"
        while True:
            with trio.move_on_after(1.0):
                await self._limits_changed.wait()
            self._limits_changed = trio.Event()
            decision = self.contribution()
            if decision.hand_back and not was_handing_back and self.provider_jobs.running():
                await self.preempt(decision.why_not or "contributor limits", None)
            if decision.contributing != was_contributing:
                log.info("contributing" if decision.contributing else "not contributing",
                         extra={"why_not": decision.why_not})
                self.market.offer_changed()
            was_contributing, was_handing_back = decision.contributing, decision.hand_back
            self._apply_throttle(decision.throttle)
            if notice_file.exists():
                await self._read_notice_file(notice_file)

    async def _read_notice_file(self, path) -> None:
        import json
        try:
            body = json.loads(path.read_text() or "{}")
        except ValueError:
            body = {}
        path.unlink(missing_ok=True)
        try:
            grace = _check_grace(body.get("grace_s") if isinstance(body, dict) else None)
        except ApiError as exc:
            log.warning("preemption notice file: default grace used", extra={"error": exc.message})
            grace = None
        await self.preempt(str(body.get("reason") or "external notice") if isinstance(body, dict)
                           else "external notice", grace)

    async def preempt(self, reason: str, grace_s: float | None) -> int:
        n = await self.provider_jobs.preempt_all(reason, grace_s)
        log.info("preemption", extra={"reason": reason, "tasks": n})
        return n

    async def _hand_back_on_stop(self) -> None:
        await self.market.withdraw_asks()
        if await self.preempt("provider shutting down", None):
            await self.provider_jobs.wait_handed_back(self.config["jobs.preemption_grace_s"])

    # ---- capability profile ------------------------------------------------------

    async def _probe(self, bench: bool = False):
        """Probe in a child process: vendor libraries (PoCL's LLVM, NVML, ...) cost
        ~80 MiB and can crash; neither should stay in the daemon."""
        import json
        import sys

        import hwprobe
        from runtimes.base import KINDS, child_env, get_runtime

        res = await trio.run_process([sys.executable, "-m", "hwprobe", "--json"]
                                     + (["--bench"] if bench else []),
                                     capture_stdout=True, capture_stderr=True, check=False,
                                     env=child_env())
        if res.returncode != 0:
            raise RuntimeError("hardware probe failed: "
                               + res.stderr.decode(errors="replace").strip()[-500:])
        profile = hwprobe.CapabilityProfile.from_json(json.loads(res.stdout))
        runtimes = {}
        for kind in KINDS:
            if kind not in self.config["runtimes.enabled"]:
                runtimes[kind] = {"available": False, "reason": "disabled in config"}
                continue
            try:
                runtimes[kind] = get_runtime(kind).available().to_json()
            except Exception as exc:  # a broken runtime module must not stop the node
                runtimes[kind] = {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
        from runtimes import vfio
        vfio.annotate(runtimes)  # GPUs reach microVMs only by VFIO passthrough: whether, and why not
        profile.runtimes = runtimes
        profile.limits = self.contributor_limits().to_json()
        # Signals and the offer under our contributor limits (cheap, in-process).
        profile = await trio.to_thread.run_sync(hwprobe.refresh_dynamic, profile)
        if not bench:
            self.profile = profile
        return profile

    async def _refresh_profile(self) -> None:
        import hwprobe
        while True:
            await trio.sleep(5)
            profile = await trio.to_thread.run_sync(hwprobe.refresh_dynamic, self.profile)
            self.profile = profile
            profile.offerable = self._offerable()  # what `probe` shows and peers hear agrees too

    def contributor_limits(self):
        """config.toml's [contributor] limits, with the owner's live changes on top."""
        from .config import contributor_limits
        return contributor_limits(self.config.values["contributor"],
                                  self.store.kv_get("contributor_limits", {}))

    def limits_json(self) -> dict:
        """Every preference with its value, type, help and whether this machine can
        evaluate it (the dashboard renders its editor from this), and the decision."""
        from hwprobe.policy import PREFERENCES, evaluability
        lim = self.contributor_limits()
        decision = self.contribution()
        overrides = self.store.kv_get("contributor_limits", {})
        sig = self.signals()
        gpus = len([d for d in self.profile.devices if d.get("kind") == "gpu"]) if self.profile else None
        notes = evaluability(lim, sig, gpus=gpus, can_throttle="container" in self.runtimes,
                             usage=self.usage)
        values = lim.to_json()
        conf = self.config.values["contributor"]
        keys = [{"key": k, "value": values[k], "type": p.type, "help": p.help, "config": conf[k],
                 "overridden": k in overrides, "evaluable": k not in notes, "note": notes.get(k)}
                for k, p in PREFERENCES.items()]
        usage = ({"cache_bytes": self.usage.cache_bytes,
                  "transferred_today_bytes": self.usage.transferred_today_bytes} if self.usage else None)
        return {"limits": values, "allowed": decision.contributing, "why_not": decision.why_not,
                "overrides": overrides, "contributing": decision.contributing, "reasons": decision.reasons,
                "hand_back": decision.hand_back, "throttle": decision.throttle, "keys": keys,
                "usage": usage}

    async def set_limits(self, body: dict) -> dict:
        """Change contributor limits live (dashboard, tray, `synord limits set`); persisted.
        Work the new limits forbid is handed back at once."""
        import hwprobe
        from hwprobe.policy import PREFERENCES, coerce
        from protocols.pacing import PACER

        from .config import contributor_limits
        unknown = set(body) - set(PREFERENCES)
        if unknown:
            raise ApiError(400, f"unknown limit(s): {', '.join(sorted(unknown))} "
                                f"(known: {', '.join(PREFERENCES)})")
        try:
            body = {k: coerce(k, v) for k, v in body.items()}
            overrides = {**self.store.kv_get("contributor_limits", {}), **body}
            overrides = {k: v for k, v in overrides.items() if v is not None}  # None: back to config
            limits = contributor_limits(self.config.values["contributor"], overrides)
        except (TypeError, ValueError) as exc:
            raise ApiError(400, f"bad limits: {exc}") from None
        PACER.rate = limits.bandwidth_bytes_per_s
        self.store.kv_set("contributor_limits", overrides)  # committed before we answer
        self.profile.limits = limits.to_json()
        self.profile = await trio.to_thread.run_sync(hwprobe.refresh_dynamic, self.profile)
        self.profile.offerable = self._offerable()
        self._limits_changed.set()
        return self.limits_json()

    # ---- API surface ---------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return bool(self.store.kv_get("paused", False))

    @property
    def contributing(self) -> bool:
        return self.contribution().contributing

    def listen_addrs(self) -> list[str]:
        return self.mesh.listen_addrs() if self.mesh else []

    def status_json(self) -> dict[str, Any]:
        decision = self.contribution()
        return {
            "peer_id": self.identity.peer_id,
            "addrs": self.listen_addrs(),
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 3),
            "peers": len(self.mesh.peers_json()) if self.mesh else 0,
            "contributing": decision.contributing,
            "why_not": decision.why_not,
            "paused": self.paused,
            "running_tasks": len(self.provider_jobs.running()) if self.provider_jobs else 0,
            "api": self.api_url,
            "metrics": self.metrics_url,
            "home": str(self.home.path),
            "storage": self.storage_json(),
        }

    def peers_json(self) -> list[dict]:
        return self.mesh.peers_json() if self.mesh else []

    async def probe_json(self, bench: bool = False) -> dict:
        if bench:
            return (await self._probe(bench=True)).to_json()
        return self.profile.to_json()

    async def pause(self) -> dict:
        self.store.kv_set("paused", True)  # committed before we answer
        log.info("paused by the contributor")
        await self.market.withdraw_asks()
        handed = await self.preempt("paused by the owner", None)
        return {"paused": True, "contributing": self.contributing, "tasks_handed_back": handed}

    async def resume(self) -> dict:
        self.store.kv_set("paused", False)
        log.info("resumed by the contributor")
        self.market.offer_changed()
        return {"paused": False, "contributing": self.contributing}

    def history_json(self, since: float = 0.0) -> dict:
        from .history import read
        return {"interval_s": self.config["history.interval_s"], "samples": read(self.store, since)}

    def book_json(self, cls: str | None = None) -> dict:
        return self.market.book_json(cls)

    def ledger_json(self) -> dict:
        return self.market.ledger_json()

    def jobs_json(self) -> list:
        provided = [{"id": t.job_id, "role": "provider", "consumer": t.consumer,
                     "state": "running" if not t.execution.done.is_set() else "ended",
                     "runtime": t.execution.spec.kind} for t in self.provider_jobs.tasks.values()]
        return self.consumer_jobs.jobs_json() + provided

    def job_json(self, job_id: str) -> dict:
        """A job this node submitted, else a task it runs for someone (the owner may see
        what their machine does; a consumer still sees only its own jobs)."""
        if job_id in self.consumer_jobs.jobs:
            return self.consumer_jobs.job_json(job_id)
        task = self.provider_jobs.task_json(job_id)
        if task is None:
            return self.consumer_jobs.job_json(job_id)  # its 404
        return task

    async def submit_job(self, spec: dict) -> dict:
        if not self.storage.check():
            raise ApiError(507, f"node storage full: not accepting jobs until it recovers: {self.storage.reason}")
        return await self.consumer_jobs.submit(spec)

    async def cancel_job(self, job_id: str) -> dict:
        if job_id not in self.consumer_jobs.jobs and self.provider_jobs.task_json(job_id) is not None:
            return await self.provider_jobs.cancel_task(job_id)
        return await self.consumer_jobs.cancel(job_id)

    def job_output(self, job_id: str, follow: bool):
        if job_id not in self.consumer_jobs.jobs and self.provider_jobs.task_json(job_id) is not None:
            return self.provider_jobs.task_output(job_id, follow)
        self.consumer_jobs.job_json(job_id)  # 404 before the stream starts
        return self.consumer_jobs.output(job_id, follow)

    def placement_json(self, job_id: str) -> dict:
        return self.consumer_jobs.placement_json(job_id)

    async def exec_job(self, job_id: str, body: dict):
        """`synord exec`/`shell`: NDJSON lines of a command run in the job's sandbox (synord.jobs.shell)."""
        if self.consumer_exec is None:
            from .jobs.shell import ConsumerExec
            self.consumer_exec = ConsumerExec(self.consumer_jobs, self.mesh.mesh, self.identity)
        return await self.consumer_exec.start(job_id, body)

    async def exec_stdin(self, session: str, body: dict) -> dict:
        if self.consumer_exec is None:
            raise ApiError(404, f"no exec session {session}")
        return await self.consumer_exec.stdin(session, body)

    async def preempt_notice(self, body: dict) -> dict:
        grace = _check_grace(body.get("grace_s"))
        n = await self.preempt(str(body.get("reason") or "external notice"), grace)
        return {"tasks_notified": n}


def _check_grace(grace: Any) -> float | None:
    if grace is not None and (isinstance(grace, bool) or not isinstance(grace, (int, float))
                              or not math.isfinite(grace) or not 0 <= grace <= MAX_GRACE_S):
        REFUSALS.count("api", "bad-number")
        raise ApiError(400, f"grace_s must be a number of seconds between 0 and {MAX_GRACE_S}")
    return grace


def run(home: Home, config: Config) -> int:
    """Run the node until it stops; 0 after a graceful stop, 1 after a failure.
    A start-up mistake (home in use or unwritable, busy or foreign address) exits
    with one line naming the setting, before api.json is written."""
    from protocols.mesh import MeshError
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
