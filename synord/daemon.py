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

import logging
import math
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
        self.profile = None  # hwprobe.CapabilityProfile once probed
        self.mesh = None  # MeshService once started
        self.market = None  # MarketService
        self.provider_jobs = None  # ProviderJobs
        self.consumer_jobs = None  # ConsumerJobs
        self.consumer_exec = None  # jobs.shell.ConsumerExec, on the first exec
        self.runtimes: dict = {}  # kind -> Runtime, those available and enabled here
        from .metrics import registry_for
        self.metrics_registry = registry_for(self)
        self._stopping = trio.Event()
        self._limits_changed = trio.Event()  # wakes the policy watcher
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
            try:
                self.home.api_json.unlink()
            except FileNotFoundError:
                pass
            self.store.close()
            log.info("stopped")

    async def _run_components(self, token: str, task_status) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_signals, nursery.cancel_scope)
            nursery.start_soon(self._watch_storage)
            await self._probe()
            nursery.start_soon(self._refresh_profile)
            await self._start_components(nursery)
            self.api_url = await nursery.start(serve_api, self, self.config["api.listen"], token)
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
        import hwprobe

        c = self.config
        self.mesh = MeshService(
            self.identity, c["node.listen"], c["node.bootstrap"], mdns=c["node.mdns"],
            profile_provider=lambda: self.profile.to_json() if self.profile is not None else None,
            announce_interval_s=c["node.announce_interval_s"])
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
        self.market = MarketService(
            self.identity, self.store, self.mesh.mesh, offer=self.market_offer,
            contributing=lambda: self.contributing, policy=policy,
            classes=lambda: hwprobe.resource_classes(self.profile),
            preemptible=c["contributor.preemptible"], min_price=c["pricing.min_price"],
            allow_peers=c["market.allow_peers"], deny_peers=c["market.deny_peers"],
            on_agreement=lambda terms: self.provider_jobs.agreement_made(terms))
        self.provider_jobs = ProviderJobs(
            self.identity, self.store, self.home, self.runtimes,
            on_finished=lambda terms, outcome, usage: self.market.provider_settle(
                terms, usage.cpu_s, usage.peak_memory_bytes, outcome),
            heartbeat_s=c["jobs.heartbeat_interval_s"], preemption_grace_s=c["jobs.preemption_grace_s"])
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
        nursery.start_soon(self._watch_policy)
        self._stop_hooks.append(self._hand_back_on_stop)

    def market_offer(self) -> dict:
        """What the market may sell now: the contributor's share of this host, and the sandboxes."""
        off = dict(self.profile.offerable) if self.profile is not None else {}
        if not self.storage.ok:  # no asks, proposals refused, until the disk recovers
            off["allowed"], off["why_not"] = False, f"provider storage full: {self.storage.reason}"
        host = self.profile.host if self.profile is not None else {}
        if off.get("allowed", True):
            # A stable share (not minus momentary load: that goes in the ask's `load`).
            cpus = float(host.get("effective_cpus") or host.get("logical_cores") or 0)
            off["cpus"] = round(cpus * self.config["contributor.cpu_share"], 2)
        load = (host.get("load") or {}).get("load1")
        off["load"] = min(1.0, load / max(1.0, off.get("cpus") or 1.0)) if load is not None else 0.0
        off["runtimes"] = sorted(self.runtimes)
        return off

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
        an external notice file (like a cloud spot notice) does too."""
        was_allowed = True
        notice_file = self.home.path / "preempt-notice"
        while True:
            with trio.move_on_after(1.0):
                await self._limits_changed.wait()
            self._limits_changed = trio.Event()
            off = self.profile.offerable if self.profile is not None else {}
            allowed = off.get("allowed", True)
            if was_allowed and not allowed:
                await self.preempt(off.get("why_not") or "contributor limits", None)
                self.market.offer_changed()
            elif allowed and not was_allowed:
                self.market.offer_changed()
            was_allowed = allowed
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
            self.profile = await trio.to_thread.run_sync(hwprobe.refresh_dynamic, self.profile)

    LIMIT_KEYS = ("cpu_share", "memory_share", "gpu_share", "idle_only", "idle_after_s", "ac_only",
                  "min_battery_percent", "allowed_hours")

    def contributor_limits(self):
        """config.toml's [contributor] limits, with the owner's live changes on top."""
        from hwprobe import ContributorLimits
        values = {k: self.config[f"contributor.{k}"] for k in self.LIMIT_KEYS}
        values.update(self.store.kv_get("contributor_limits", {}))
        values["allowed_hours"] = values["allowed_hours"] or None
        return ContributorLimits(**values)

    def limits_json(self) -> dict:
        lim = self.contributor_limits()
        off = self.profile.offerable if self.profile is not None else {}
        return {"limits": lim.to_json(), "allowed": off.get("allowed", True),
                "why_not": off.get("why_not"), "overrides": self.store.kv_get("contributor_limits", {})}

    async def set_limits(self, body: dict) -> dict:
        """Change contributor limits live (dashboard, tray, `synord limits set`); persisted.
        Work the new limits forbid is handed back at once."""
        import hwprobe
        unknown = set(body) - set(self.LIMIT_KEYS)
        if unknown:
            raise ApiError(400, f"unknown limit(s): {', '.join(sorted(unknown))} "
                                f"(known: {', '.join(self.LIMIT_KEYS)})")
        overrides = {**self.store.kv_get("contributor_limits", {}), **body}
        overrides = {k: v for k, v in overrides.items() if v is not None}  # None: back to config
        try:
            values = {k: self.config[f"contributor.{k}"] for k in self.LIMIT_KEYS}
            values.update(overrides)
            values["allowed_hours"] = values["allowed_hours"] or None
            limits = hwprobe.ContributorLimits(**values)
        except (TypeError, ValueError) as exc:
            raise ApiError(400, f"bad limits: {exc}") from None
        self.store.kv_set("contributor_limits", overrides)  # committed before we answer
        self.profile.limits = limits.to_json()
        self.profile = await trio.to_thread.run_sync(hwprobe.refresh_dynamic, self.profile)
        self._limits_changed.set()
        return self.limits_json()

    # ---- API surface ---------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return bool(self.store.kv_get("paused", False))

    @property
    def contributing(self) -> bool:
        return self.config["contributor.enabled"] and not self.paused

    def listen_addrs(self) -> list[str]:
        return self.mesh.listen_addrs() if self.mesh else []

    def status_json(self) -> dict[str, Any]:
        return {
            "peer_id": self.identity.peer_id,
            "addrs": self.listen_addrs(),
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 3),
            "peers": len(self.mesh.peers_json()) if self.mesh else 0,
            "contributing": self.contributing,
            "paused": self.paused,
            "api": self.api_url,
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
        return self.consumer_jobs.job_json(job_id)

    async def submit_job(self, spec: dict) -> dict:
        if not self.storage.check():
            raise ApiError(507, f"node storage full: not accepting jobs until it recovers: {self.storage.reason}")
        return await self.consumer_jobs.submit(spec)

    async def cancel_job(self, job_id: str) -> dict:
        return await self.consumer_jobs.cancel(job_id)

    def job_output(self, job_id: str, follow: bool):
        self.consumer_jobs.job_json(job_id)  # 404 before the stream starts
        return self.consumer_jobs.output(job_id, follow)

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
    """Run the node until it stops; 0 after a graceful stop, 1 after a failure."""
    try:
        node = Node(home, config)
    except Exception as exc:  # unusable identity or state store: say why, no traceback
        log.error("cannot start", extra={"error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(f"synord: cannot start: {exc}") from None
    try:
        trio.run(node.run)
    except Exception:
        log.exception("daemon failed")
        return 1
    return 0
