"""The owner's policy for this machine: what it contributes, when, and how much.

State it owns: the contributor limits (config.toml's [contributor] with the
owner's live overrides, kv ``contributor_limits``), the pause (kv ``paused``),
the desktop session's idle report, the usage counters (task cache size,
bytes transferred today) and the CPU throttle given to running containers.

It makes THE one decision "is this node contributing, and if not why"
(`contribution`, synord.hwprobe.policy.decide) that status, limits, the dashboard,
the metrics and the asks all read; it watches that decision and preempts
running work when it turns to "hand back"; it answers the API's limits, idle,
pause, resume and preempt operations.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import trio

from synord.protocols.refusals import REFUSALS

from .errors import Invalid

if TYPE_CHECKING:
    from .daemon import Node

log = logging.getLogger("synord.contributor")

SESSION_IDLE_TTL_S = 120.0  # a session idle report counts this long (the tray re-reports every few s)
USAGE_WALK_SHARE = 100  # measure_usage sleeps this many times as long as its walk took
MAX_GRACE_S = 86400  # a preemption notice longer than a day is not a notice


class Contributor:
    def __init__(self, node: "Node"):
        # The node's assembled components (config, store, profile, market, provider jobs…)
        # are read through it: they are started after this object exists.
        self.node = node
        self.config = node.config
        self.store = node.store
        self.usage = None  # synord.hwprobe.policy.Usage: task cache size and today's transfers
        self.limits_changed = trio.Event()  # wakes the policy watcher
        self._throttled: dict[str, float] = {}  # job id -> cores its cgroup was last given
        self._session_idle: tuple[float, float] | None = None  # (idle_s, monotonic when reported)

    # ---- the limits --------------------------------------------------------------------

    def limits(self):
        """config.toml's [contributor] limits, with the owner's live changes on top."""
        from .config import contributor_limits
        return contributor_limits(self.config.values["contributor"],
                                  self.store.kv_get("contributor_limits", {}))

    def limits_json(self) -> dict:
        """Every preference with its value, type, help and whether this machine can
        evaluate it (the dashboard renders its editor from this), and the decision."""
        from synord.hwprobe.policy import PREFERENCES, evaluability
        lim = self.limits()
        decision = self.contribution()
        overrides = self.store.kv_get("contributor_limits", {})
        sig = self.signals()
        profile = self.node.profile
        gpus = len([d for d in profile.devices if d.get("kind") == "gpu"]) if profile else None
        notes = evaluability(lim, sig, gpus=gpus, can_throttle="container" in self.node.runtimes,
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
        from synord import hwprobe
        from synord.hwprobe.policy import PREFERENCES, coerce
        from synord.protocols.pacing import PACER

        from .config import contributor_limits
        unknown = set(body) - set(PREFERENCES)
        if unknown:
            raise Invalid(f"unknown limit(s): {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(PREFERENCES)})")
        try:
            body = {k: coerce(k, v) for k, v in body.items()}
            overrides = {**self.store.kv_get("contributor_limits", {}), **body}
            overrides = {k: v for k, v in overrides.items() if v is not None}  # None: back to config
            limits = contributor_limits(self.config.values["contributor"], overrides)
        except (TypeError, ValueError) as exc:
            raise Invalid(f"bad limits: {exc}") from None
        PACER.rate = limits.bandwidth_bytes_per_s
        self.store.kv_set("contributor_limits", overrides)  # committed before we answer
        node = self.node
        node.profile.limits = limits.to_json()
        node.profile = await trio.to_thread.run_sync(hwprobe.refresh_dynamic, node.profile)
        node.profile.offerable = self.offerable()
        self.limits_changed.set()
        return self.limits_json()

    # ---- the one decision ----------------------------------------------------------------

    def signals(self):
        """The last probed contributor signals, with the desktop session's idle time
        (reported by the tray, POST /v1/idle) where the daemon sees none itself."""
        from synord import hwprobe
        profile = self.node.profile
        sig = hwprobe.ContributorSignals.from_json((profile.signals if profile else None) or {})
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
            raise Invalid("idle_s must be a number of seconds >= 0")
        self._session_idle = (float(idle), time.monotonic())
        self.limits_changed.set()
        return {"idle_s": float(idle), "source": self.signals().idle_source}

    @property
    def paused(self) -> bool:
        return bool(self.store.kv_get("paused", False))

    def contribution(self):
        """THE answer to "is this node contributing, and if not why": status, limits,
        the dashboard, the metrics and the asks all read it (synord.hwprobe.policy.decide)."""
        from synord.hwprobe.policy import decide
        d = decide(self.limits(), self.signals(), self.usage,
                   enabled=self.config["contributor.enabled"], paused=self.paused)
        storage = self.node.storage
        if storage is not None and not storage.ok:  # no new work until the disk recovers
            d = dataclasses.replace(d, contributing=False,
                                    reasons=[*d.reasons, f"provider storage full: {storage.reason}"])
        return d

    @property
    def contributing(self) -> bool:
        return self.contribution().contributing

    def offerable(self) -> dict:
        """The profile's offer under the one contribution decision (synord.hwprobe.policy.decide)."""
        from synord import hwprobe
        if self.node.profile is None:
            return {}
        return hwprobe.offerable(self.node.profile, self.limits(), self.signals(), self.usage,
                                 decision=self.contribution())

    def market_offer(self) -> dict:
        """What the market may sell now: the contributor's share of this host, and the sandboxes."""
        off = self.offerable()
        profile = self.node.profile
        host = profile.host if profile is not None else {}
        if off.get("allowed", True):
            # A stable share (not minus momentary load: that goes in the ask's `load`).
            cpus = float(host.get("effective_cpus") or host.get("logical_cores") or 0)
            off["cpus"] = round(cpus * self.config["contributor.cpu_share"], 2)
        load = (host.get("load") or {}).get("load1")
        off["load"] = min(1.0, load / max(1.0, off.get("cpus") or 1.0)) if load is not None else 0.0
        off["runtimes"] = sorted(self.node.runtimes)
        gpu = self.node.gpu
        units = gpu.units() if gpu is not None else []  # only what CDI can inject, and VFIO GPUs
        vfio = [u for u in units if u.get("vfio")]  # microVM passthrough: not in the probe's GPU count
        units = [u for u in units if not u.get("vfio")]
        if units and off.get("gpus"):  # GPUs by class of unit (MIG instances count one each)
            from .gpu_devices import offer_classes
            allowed = len(units) if off["gpus"] >= len([d for d in profile.devices if d.get("kind") == "gpu"]) \
                else off["gpus"]
            off["gpu_classes"] = offer_classes(units, allowed)
            off["gpus"] = sum(c["count"] for c in off["gpu_classes"])
        if vfio and off.get("allowed", True):  # the same share of them, under the same decision
            from .gpu_devices import offer_classes
            share = self.limits().gpu_share if self.contribution().gpus_allowed else 0.0
            if n := math.floor(len(vfio) * share + 1e-9):
                off["gpu_classes"] = off.get("gpu_classes", []) + offer_classes(vfio, n)
                off["gpus"] = sum(c["count"] for c in off["gpu_classes"])
        return off

    # ---- acting on it ----------------------------------------------------------------------

    async def measure_usage(self) -> None:
        """Task cache size and bytes transferred today, for disk_limit_bytes and
        daily_transfer_bytes (a walk of a few directories, off the event loop)."""
        from synord.hwprobe.policy import Usage
        from synord.hwprobe.signals import disk_usage
        h = self.node.home
        while True:
            t = time.localtime()
            midnight = time.mktime((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0, 0, 0, -1))
            started = time.monotonic()
            cache, _ = await trio.to_thread.run_sync(disk_usage, [h.work], 0.0)
            blobs, today = await trio.to_thread.run_sync(disk_usage, [h.artifacts, h.checkpoints], midnight)
            took = time.monotonic() - started
            was = self.usage
            self.usage = Usage(cache_bytes=cache + blobs, transferred_today_bytes=today)
            if was is None:
                self.limits_changed.set()
            # every 5 s, or rarer when a big cache makes the walk slow: at most ~1 % of a core
            await trio.sleep(max(5.0, USAGE_WALK_SHARE * took))

    async def watch_policy(self) -> None:
        """Contributor limits turning false (user back, battery, hours) preempt running work;
        reasons that only stop new work (network hours, transfer, disk, other CPU use)
        withdraw the asks; the CPU throttle follows the preferences live. An external
        notice file (like a cloud spot notice) preempts too."""
        was_contributing, was_handing_back = True, False
        notice_file = self.node.home.path / "preempt-notice"
        while True:
            with trio.move_on_after(1.0):
                await self.limits_changed.wait()
            self.limits_changed = trio.Event()
            decision = self.contribution()
            if decision.hand_back and not was_handing_back and self.node.provider_jobs.running():
                await self.preempt(decision.why_not or "contributor limits", None)
            if decision.contributing != was_contributing:
                log.info("contributing" if decision.contributing else "not contributing",
                         extra={"why_not": decision.why_not})
                self.node.market.offer_changed()
            was_contributing, was_handing_back = decision.contributing, decision.hand_back
            self.apply_throttle(decision.throttle)
            if notice_file.exists():
                await self._read_notice_file(notice_file)

    def apply_throttle(self, throttle: float) -> None:
        """cpu.max of every running container task = its agreed cores x the throttle
        (cpu_time_percent, or 1 % while suspended for other processes' CPU use)."""
        running = self.node.provider_jobs.running()
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

    async def _read_notice_file(self, path) -> None:
        try:
            body = json.loads(path.read_text() or "{}")
        except ValueError:
            body = {}
        path.unlink(missing_ok=True)
        try:
            grace = check_grace(body.get("grace_s") if isinstance(body, dict) else None)
        except Invalid as exc:
            log.warning("preemption notice file: default grace used", extra={"error": exc.message})
            grace = None
        await self.preempt(str(body.get("reason") or "external notice") if isinstance(body, dict)
                           else "external notice", grace)

    async def preempt(self, reason: str, grace_s: float | None) -> int:
        n = await self.node.provider_jobs.preempt_all(reason, grace_s)
        log.info("preemption", extra={"reason": reason, "tasks": n})
        return n

    async def preempt_notice(self, body: dict) -> dict:
        grace = check_grace(body.get("grace_s"))
        n = await self.preempt(str(body.get("reason") or "external notice"), grace)
        return {"tasks_notified": n}

    async def hand_back_on_stop(self) -> None:
        await self.node.market.withdraw_asks()
        if await self.preempt("provider shutting down", None):
            await self.node.provider_jobs.wait_handed_back(self.config["jobs.preemption_grace_s"])

    async def pause(self) -> dict:
        self.store.kv_set("paused", True)  # committed before we answer
        log.info("paused by the contributor")
        await self.node.market.withdraw_asks()
        handed = await self.preempt("paused by the owner", None)
        return {"paused": True, "contributing": self.contributing, "tasks_handed_back": handed}

    async def resume(self) -> dict:
        self.store.kv_set("paused", False)
        log.info("resumed by the contributor")
        self.node.market.offer_changed()
        return {"paused": False, "contributing": self.contributing}


def check_grace(grace: Any) -> float | None:
    if grace is not None and (isinstance(grace, bool) or not isinstance(grace, (int, float))
                              or not math.isfinite(grace) or not 0 <= grace <= MAX_GRACE_S):
        REFUSALS.count("api", "bad-number")
        raise Invalid(f"grace_s must be a number of seconds between 0 and {MAX_GRACE_S}")
    return grace
