"""Consumer side of services: renew each period, expect each period's receipt,
keep what the provider says of the service (restarts, volumes) for `synord
status JOB`.

Driven from `TaskClient._watch` after every frame (heartbeats come every
second, so a renewal is never later than that): the period bookkeeping is
`synord.protocols.servicelease.ServiceLease`'s, the same machine the provider
runs; this module only sends what it says is due and registers with the
market the receipts to countersign.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synord.protocols import taskstream as ts
from synord.protocols.envelope import now_ms
from synord.protocols.refusals import REFUSALS
from synord.protocols.servicelease import ServiceLease, period_terms
from synord.protocols.transfer import sha256_of

log = logging.getLogger("synord.jobs.consumer")

if TYPE_CHECKING:
    from .consumer import ConsumerJob
    from .task_client import Session


def lease_of(job: "ConsumerJob", session: "Session") -> ServiceLease | None:
    """The session's service lease (made on first use; None for a task or without terms)."""
    if job.jobspec.service is None or session.terms is None:
        return None
    if session.service is None:
        session.service = ServiceLease(session.terms, int(job.jobspec.service["period_s"] * 1000))
    return session.service


async def tick(market: Any, job: "ConsumerJob", session: "Session") -> None:
    """Renew the next period when due; expect the receipt of each period once it started."""
    lease = lease_of(job, session)
    if lease is None or job.cancel_requested or session.machine.state not in (ts.State.STREAMING, ts.State.BLOB):
        return  # after the exit frame nothing more is renewed (nor may be sent)
    now = now_ms()
    # All that is due at once: after our restart the new lease starts from period 0 and
    # walks up to the provider's (a renewal it already has is harmless there).
    while (k := lease.due(now)) is not None:
        await session.send(ts.Renew(k))
        lease.renewed(k)
    # A period's receipt is countersigned for no more than we saw of it: from its start
    # (our clock) to the receipt's arrival. The last period is the agreement's own receipt's.
    while session.expected <= min(lease.current(now), lease.last - 1):
        market.expect_receipt(period_terms(session.terms, lease.period_ms, session.expected))
        session.expected += 1
    job.service_view = {**(job.service_view or {}), **lease.view(now)}


def observed(job: "ConsumerJob", session: "Session", info: ts.ServiceInfo, record) -> None:
    """The provider's word on the service: restarts (into the history), volume sizes, and
    what it counts paid (taken only up to the period after ours: it can only spare us a
    renewal, never make us pay one more)."""
    lease = lease_of(job, session)
    if lease is not None:
        lease.paid = max(lease.paid, min(info.paid, lease.current(now_ms()) + 1, lease.last))
    view = job.service_view or {}
    if info.restarts != view.get("restarts_here"):
        record(restarts=info.restarts)  # this placement's history entry
    volumes = {v["name"]: v for v in job.jobspec.service.get("volumes", [])}
    job.service_view = {**view, "restarts_here": info.restarts, "provider_paid": info.paid,
                        "volumes": [{**v, "bytes": info.volumes.get(n)} for n, v in volumes.items()]}


def closed(market: Any, job: "ConsumerJob", session: "Session") -> None:
    """The session ended: periods whose window had not ended get no receipt of their own
    (the agreement's final receipt bills from the last full period on)."""
    lease = session.service
    if lease is None:
        return
    now = now_ms()
    for k in range(session.expected):
        pt = period_terms(session.terms, lease.period_ms, k)
        if pt.expires > now:
            market.forget_receipt(pt)


async def receive_volume(jobs: Any, job: "ConsumerJob", session: "Session", ev: ts.Volume) -> None:
    """A handed-back service's volume (its blob follows): kept, digest checked, to travel
    to the next provider with the task.start (`restore`)."""
    head = session.machine.receive(await session.stream.receive())
    if not isinstance(head, ts.Blob):
        raise RuntimeError("volume header without its blob")
    if ev.name not in {v["name"] for v in job.jobspec.service.get("volumes", [])}:
        REFUSALS.count(ts.WHERE, "unknown_volume")  # read past it, keep nothing
    tmp = jobs.ckpt_dir / f"{job.id}-vol-{ev.name}.part"
    left = ev.size
    with open(tmp, "wb") as f:
        while left:
            block = await session.stream.read_raw(min(left, 1 << 16))
            session.lease.heard("task", now_ms())
            left -= len(block)
            f.write(block)
    if ev.name not in {v["name"] for v in job.jobspec.service.get("volumes", [])} or sha256_of(tmp) != ev.sha256:
        tmp.unlink(missing_ok=True)
        REFUSALS.count(ts.WHERE, "volume_digest")
        log.warning("volume refused", extra={"job": job.id, "volume": ev.name})
        return
    dest = jobs.ckpt_dir / f"{job.id}-vol-{ev.name}-{ev.sha256[:16]}.tar"
    tmp.replace(dest)
    vols = dict(job.runstate.volumes or {})
    old = vols.get(ev.name)
    vols[ev.name] = {"sha256": ev.sha256, "bytes": ev.size, "path": str(dest)}
    job.spec["volumes"] = vols
    jobs._save(job)
    if old and old.get("path") != str(dest):
        Path(old["path"]).unlink(missing_ok=True)
    log.info("volume stored", extra={"job": job.id, "volume": ev.name, "bytes": ev.size})


async def ship_volumes(jobs: Any, job: "ConsumerJob", peer: str, body: dict) -> None:
    """Before a service's task.start elsewhere: its volumes from the last hand-over go
    first, and the start names them (``service.restore``)."""
    vols = {n: v for n, v in (job.runstate.volumes or {}).items() if Path(v["path"]).exists()}
    if not vols or "service" not in body:
        return
    for v in vols.values():
        await jobs._push(peer, Path(v["path"]), v["sha256"], "volume", job)
    body["service"] = {**body["service"], "restore": {n: v["sha256"] for n, v in vols.items()}}


def to_json(job: "ConsumerJob") -> dict:
    """`service` in the job's JSON: state, restarts (all placements), period, renewal, volumes."""
    view = dict(job.service_view or {})
    view.pop("provider_paid", None)
    view.pop("restarts_here", None)
    spec = job.jobspec.service or {}
    running = job.state == "running"
    out = {"state": "running" if running else job.state,
           "restarts": sum(int(h.get("restarts") or 0) for h in job.history),
           "placements": len(job.history), "period_s": spec.get("period_s"),
           "health": spec.get("health"),
           "volumes": view.pop("volumes", None) or [{**v, "bytes": None} for v in spec.get("volumes", [])]}
    if running:
        out.update(view)
    else:
        out["next_renewal"] = None
    out["at"] = time.time()
    return out
