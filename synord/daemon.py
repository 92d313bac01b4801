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
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from protocols.identity import Identity, load as load_identity

from . import __version__
from .api import ApiError, serve as serve_api
from .config import Config
from .home import Home
from .sdnotify import Notifier, scrub_environment
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


class Node:
    def __init__(self, home: Home, config: Config):
        self.home = home
        self.config = config
        self.identity: Identity = load_identity(home.identity)
        self.store = Store(home.db)
        self.started_at = time.time()
        self.notifier = Notifier()
        scrub_environment()  # children must not inherit NOTIFY_SOCKET / WATCHDOG_*
        self.api_url: str | None = None
        self.profile = None  # hwprobe.CapabilityProfile once probed
        self.mesh = None  # MeshService once started
        self.metrics_registry = _new_registry()
        self._stopping = trio.Event()
        # Awaited in order on graceful stop (jobs hand their tasks back first).
        self._stop_hooks: list = []

    # ---- lifecycle -------------------------------------------------------------

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        token = self.home.ensure_token()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals, nursery.cancel_scope)
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
        finally:
            try:
                self.home.api_json.unlink()
            except FileNotFoundError:
                pass
            self.store.close()
            log.info("stopped")

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
        from .mesh_service import MeshService
        self.mesh = MeshService(
            self.identity, self.config["node.listen"], self.config["node.bootstrap"],
            mdns=self.config["node.mdns"],
            profile_provider=lambda: self.profile.to_json() if self.profile is not None else None,
            announce_interval_s=self.config["node.announce_interval_s"])
        await nursery.start(self.mesh.run)

    # ---- capability profile ------------------------------------------------------

    async def _probe(self) -> None:
        import hwprobe
        from runtimes.base import KINDS, get_runtime

        def probe():
            runtimes = {}
            for kind in KINDS:
                if kind not in self.config["runtimes.enabled"]:
                    runtimes[kind] = {"available": False, "reason": "disabled in config"}
                    continue
                try:
                    runtimes[kind] = get_runtime(kind).available().to_json()
                except Exception as exc:  # a broken runtime module must not stop the node
                    runtimes[kind] = {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
            return hwprobe.probe(runtimes=runtimes, limits=self.contributor_limits())

        self.profile = await trio.to_thread.run_sync(probe)

    async def _refresh_profile(self) -> None:
        import hwprobe
        while True:
            await trio.sleep(5)
            self.profile = await trio.to_thread.run_sync(hwprobe.refresh_dynamic, self.profile)

    def contributor_limits(self):
        from hwprobe import ContributorLimits
        c = self.config
        return ContributorLimits(
            cpu_share=c["contributor.cpu_share"], memory_share=c["contributor.memory_share"],
            gpu_share=c["contributor.gpu_share"], idle_only=c["contributor.idle_only"],
            ac_only=c["contributor.ac_only"],
            min_battery_percent=c["contributor.min_battery_percent"],
            allowed_hours=c["contributor.allowed_hours"] or None)

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
        }

    def peers_json(self) -> list[dict]:
        return self.mesh.peers_json() if self.mesh else []

    async def probe_json(self, bench: bool = False) -> dict:
        if bench:
            import hwprobe
            prof = await trio.to_thread.run_sync(
                lambda: hwprobe.probe(bench=True, runtimes=self.profile.runtimes,
                                      limits=self.contributor_limits()))
            return prof.to_json()
        return self.profile.to_json()

    def pause(self) -> dict:
        self.store.kv_set("paused", True)  # committed before we answer
        log.info("paused by the contributor")
        return {"paused": True, "contributing": self.contributing}

    def resume(self) -> dict:
        self.store.kv_set("paused", False)
        log.info("resumed by the contributor")
        return {"paused": False, "contributing": self.contributing}

    def book_json(self, cls: str | None = None) -> dict:
        raise ApiError(503, "the market is not running on this node")

    def ledger_json(self) -> dict:
        raise ApiError(503, "the ledger is not running on this node")

    def jobs_json(self) -> list:
        raise ApiError(503, "jobs are not available on this node")

    def job_json(self, job_id: str) -> dict:
        raise ApiError(503, "jobs are not available on this node")

    def submit_job(self, spec: dict) -> dict:
        raise ApiError(503, "jobs are not available on this node")

    def cancel_job(self, job_id: str) -> dict:
        raise ApiError(503, "jobs are not available on this node")

    def job_output(self, job_id: str, follow: bool):
        raise ApiError(503, "jobs are not available on this node")

    def preempt_notice(self, body: dict) -> dict:
        raise ApiError(503, "preemption is not available on this node")


def _new_registry():
    from prometheus_client import CollectorRegistry
    return CollectorRegistry()


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
