"""Provider side of services: a task that stays up, paid and billed per period,
watched by a health check, restarted in place when the check keeps failing,
its named volumes mounted from the provider's disk.

The period bookkeeping is `synord.protocols.servicelease.ServiceLease`'s; this
driver only feeds it the clock and the consumer's renewals, and does what it
says: bill a period (`on_period`: the market signs and delivers the receipt),
or stop the service when the paid time is over.  A health-check failure
``retries`` times in a row sets ``task.restarting`` and kills the sandbox;
`ProviderJobs._run_task` then runs a fresh sandbox from the same artefact
(`rerun`), its output numbered on from where the last one stopped, so the
consumer's stream never sees an exit between the two.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import trio

from synord.protocols.negotiation import Terms
from synord.protocols.refusals import REFUSALS
from synord.protocols.servicelease import Bill, ServiceLease, Stop, period_terms
from synord.protocols.servicespec import ServiceSpecError, VolumeError, check_service
from synord.runtimes.base import Mount

from ..volumes import Volumes
from .executor import TaskExecution

if TYPE_CHECKING:
    from .provider import ProviderTask

log = logging.getLogger("synord.jobs.services")

HEALTH_TIMEOUT_S = 5.0  # one check's deadline
HEALTH_GRACE_S = 1.0
SIZES_EVERY_S = 5.0  # how often a service's volumes are measured (a walk of their trees)
CLONE_NEWNET = 0x40000000  # after a (re)start, before the first check


@dataclass
class ServiceRun:
    """One service on this provider: its spec, lease, health and restarts."""
    spec: dict
    lease: ServiceLease
    restarts: int = 0
    failures: int = 0  # health-check failures in a row
    last_health: str | None = None
    sandboxes: int = 1
    sizes: dict = field(default_factory=dict)  # volume name -> bytes, measured every SIZES_EVERY_S
    sized_at: float = float("-inf")
    cpu_billed: float = 0.0  # CPU seconds of the current sandbox already on a period receipt


class ProviderServices:
    def __init__(self, volumes: Volumes, on_period: Callable[[Terms, Terms, float, int], None] | None = None):
        self.volumes = volumes
        self.on_period = on_period  # (agreement, period's terms, cpu_s, peak memory): the market bills it
        self.runs: dict[bytes, ServiceRun] = {}  # agreement id -> its service (while the node runs)

    # ---- at task.start ----------------------------------------------------------------

    def prepare(self, consumer: str, body: dict, spec, blobs) -> dict | None:
        """Check a task.start's ``service``, restore volumes that travelled with it (from
        ``blobs``, digest checked) and mount its volumes into the sandbox spec; raises
        ServiceSpecError / VolumeError (each with its slug) on a bad one."""
        if body.get("service") is None:
            return None
        service = check_service(body["service"])
        if service["volumes"] and spec.kind != "container":
            raise VolumeError("volumes are mounted into containers only", "volume_unsupported")
        if service["volumes"]:  # a consumer over its quota starts no service with volumes here
            self.volumes.check_quota(consumer)
        for name, sha in service.get("restore", {}).items():
            if not blobs.has(sha):
                raise VolumeError(f"volume {name} not transferred", "no_volume")
            try:
                self.volumes.restore(consumer, name, blobs.path(sha), sha)
            except VolumeError:
                raise
            except Exception as exc:  # a corrupted tar: refused, never half-unpacked
                raise VolumeError(f"volume {name} unreadable: {exc}", "bad_volume_blob") from None
        for v in service["volumes"]:
            spec.mounts.append(Mount(self.volumes.path(consumer, v["name"]), v["path"], writable=True))
        return service

    def start(self, nursery: trio.Nursery, task: "ProviderTask", service: dict) -> None:
        lease = ServiceLease(task.terms, int(service["period_s"] * 1000))
        task.service = self.runs[task.terms.aid] = ServiceRun(service, lease)
        nursery.start_soon(self._supervise, task)

    # ---- renewals and periods -----------------------------------------------------------

    def renewed(self, task: "ProviderTask", k: int) -> None:
        run = task.service
        if run is None:
            REFUSALS.count("service", "not_a_service")
            return
        slug = run.lease.renewed(k)
        if slug is not None:
            REFUSALS.count("service", slug)
            log.info("renewal refused", extra={"job": task.job_id, "reason": slug})

    def billed_until_aid(self, aid: bytes) -> int | None:
        """Where the final receipt of the service under ``aid`` starts (None: not a service)."""
        run = self.runs.pop(aid, None)
        return run.lease.billed_until if run is not None else None

    async def pack_volumes(self, task: "ProviderTask") -> list[tuple[str, Path, str, int]]:
        """A handed-back service's volumes as tars beside them: (name, tar, sha256, bytes)."""
        out = []
        for v in task.service.spec["volumes"]:
            tar = self.volumes.root / f".out-{task.key}-{v['name']}.tar"  # the workdir goes with the task
            sha, size = await trio.to_thread.run_sync(self.volumes.pack, task.consumer, v["name"], tar)
            out.append((v["name"], tar, sha, size))
        return out

    def _period_usage(self, task: "ProviderTask") -> tuple[float, int]:
        """(CPU seconds since the last period's receipt, peak memory) of the current sandbox."""
        run = task.service
        cg = getattr(task.execution.sandbox, "cgroup", None)
        try:
            cpu, peak = cg.usage() if cg is not None else (run.cpu_billed, 0)
        except OSError:
            return 0.0, 0
        used, run.cpu_billed = max(0.0, cpu - run.cpu_billed), max(run.cpu_billed, cpu)
        return round(used, 3), peak

    def final_usage(self, task: "ProviderTask", usage):
        """The usage the agreement's own (last) receipt bills: what no period receipt did."""
        if task.service is None:
            return usage
        return replace(usage, cpu_s=max(0.0, usage.cpu_s - task.service.cpu_billed))

    def info(self, task: "ProviderTask") -> dict:
        run = task.service
        return {"restarts": run.restarts, "paid": run.lease.paid, "volumes": dict(run.sizes)}

    async def _measure(self, task: "ProviderTask") -> str | None:
        """Refresh the volumes' sizes; the reason to stop when the consumer is over its quota."""
        run = task.service
        if not run.spec["volumes"] or trio.current_time() - run.sized_at < SIZES_EVERY_S:
            return None
        run.sized_at = trio.current_time()
        names = [v["name"] for v in run.spec["volumes"]]
        run.sizes = await trio.to_thread.run_sync(self.volumes.sizes, task.consumer, names)
        try:
            await trio.to_thread.run_sync(self.volumes.check_quota, task.consumer)
        except VolumeError as exc:
            return str(exc)
        return None

    async def _supervise(self, task: "ProviderTask") -> None:
        run = task.service
        async with trio.open_nursery() as n:
            if run.spec["health"]:
                n.start_soon(self._health_loop, task)
            while not (task.execution.done.is_set() and not task.restarting):
                for action in run.lease.tick(int(time.time() * 1000)):
                    if isinstance(action, Bill) and self.on_period is not None:
                        self.on_period(task.terms, period_terms(task.terms, run.lease.period_ms, action.period),
                                       *self._period_usage(task))
                        log.info("service period billed", extra={"job": task.job_id, "period": action.period})
                    elif isinstance(action, Stop):
                        await self._stop(task, action.reason)
                over = await self._measure(task)
                if over is not None:
                    run.lease.stop("volume_quota")
                    await self._stop(task, "volume_quota", over)
                nxt = run.lease.next_deadline()
                wait = 1.0 if nxt is None else max(0.05, min(1.0, nxt / 1000 - time.time()))
                with trio.move_on_after(wait):
                    await task.execution.done.wait()
            n.cancel_scope.cancel()

    async def _stop(self, task: "ProviderTask", reason: str, detail: str = "") -> None:
        log.info("service stopped", extra={"job": task.job_id, "reason": reason, "detail": detail})
        task.restarting = False
        task.execution.error = f"service stopped: {detail or reason.replace('_', ' ')}"
        await task.execution.cancel()

    # ---- health and restarts ----------------------------------------------------------

    async def _health_loop(self, task: "ProviderTask") -> None:
        run = task.service
        h = run.spec["health"]
        await trio.sleep(HEALTH_GRACE_S)
        while True:
            await trio.sleep(h["interval_s"])
            ex = task.execution
            if ex.done.is_set() or task.restarting or ex.sandbox is None or task.preempt:
                continue  # no restart while the service is being handed back
            ok, why = await self._check(ex, h)
            run.last_health = "ok" if ok else why
            run.failures = 0 if ok else run.failures + 1
            if run.failures >= h["retries"] and not ex.done.is_set():
                log.warning("service unhealthy: restarting", extra={"job": task.job_id, "why": why,
                                                                    "failures": run.failures})
                task.restarting = True
                run.failures = 0
                await ex.cancel()

    async def _check(self, ex: TaskExecution, h: dict) -> tuple[bool, str]:
        with trio.move_on_after(HEALTH_TIMEOUT_S):
            try:
                if "cmd" in h:
                    async with ex.sandbox.exec(h["cmd"]) as proc:
                        async for _ in proc.output:
                            pass
                        code = await proc.wait()
                    return code == 0, f"health command exited {code}"
                pid = _sandbox_pid(ex.sandbox)
                if pid is None:
                    return False, "no process in the sandbox"
                await trio.to_thread.run_sync(_connect_in_netns, pid, h["tcp"])
                return True, "ok"
            except Exception as exc:
                return False, f"{type(exc).__name__}: {exc}"[:200]
        return False, "health check timed out"

    async def rerun(self, task: "ProviderTask") -> None:
        """A fresh sandbox for a service whose health check failed: same artefact, mounts
        and limits; output offsets go on from the old one's end."""
        old = task.execution
        run = task.service
        run.restarts += 1
        run.cpu_billed = 0.0  # a new cgroup counts from zero (the old one's last seconds go unbilled)
        run.sandboxes += 1  # each sandbox its own directory: the old one may still be torn down
        shutil.rmtree(old.spec.workdir, ignore_errors=True)
        workdir = task.workdir / f"sandbox-{run.sandboxes}"
        workdir.mkdir()
        spec = replace(old.spec, workdir=workdir, mounts=list(old.spec.mounts))
        task.execution = TaskExecution(task.job_id, old.runtime, spec, start_offsets=dict(old.output.offsets))
        task.restarting = False
        old.output.changed.set()  # the writer moves to the new execution
        log.info("service restarted", extra={"job": task.job_id, "restarts": run.restarts})
        await task.execution.run()


def _sandbox_pid(sandbox) -> int | None:
    """A process inside the sandbox, for its network namespace: the first one in its
    task cgroup or below it (the container's own cgroup is a child of the task's)."""
    cg = getattr(sandbox, "cgroup", None)
    ours = os.stat("/proc/self/ns/net").st_ino
    for top in (cg._dirs() if cg is not None else []):
        for root, _dirs, _files in os.walk(top):
            try:
                pids = Path(root, "cgroup.procs").read_text().split()
            except OSError:
                continue
            for pid in pids:  # never a process in our own namespace (a runtime helper)
                try:
                    if os.stat(f"/proc/{pid}/ns/net").st_ino != ours:
                        return int(pid)
                except OSError:
                    continue
    return None


def _connect_in_netns(pid: int, port: int) -> None:
    """A TCP connect to 127.0.0.1:port inside process ``pid``'s network namespace
    (this thread enters it, and goes back to ours before returning)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    def setns(fd: int) -> None:  # os.setns is Python 3.12's
        if libc.setns(fd, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    theirs = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        setns(theirs)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=HEALTH_TIMEOUT_S):
                pass
        finally:
            setns(own)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ETIMEDOUT):
            raise ConnectionRefusedError(f"port {port}: {os.strerror(exc.errno)}") from None
        raise
    finally:
        os.close(own)
        os.close(theirs)


__all__ = ["ProviderServices", "ServiceRun", "ServiceSpecError", "VolumeError"]
