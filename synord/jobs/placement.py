"""Placing a consumer's job: the placement loop, the pre-placement before a
hand-over, and the batch assignment of jobs displaced together.

- `place` proposes to the ranked candidates until one agrees and the task
  starts there (through the consumer driver's `_launch`), or fails with every
  answer after ``placement_timeout_s`` (`NoPlacement`).
- `preplace` agrees with the next provider while the task still runs, so the
  old one can send the checkpoint straight there.
- `join_replacement`: jobs displaced at about the same time (one provider's
  preemption notices arrive together) wait ``BATCH_WINDOW_S`` and are
  assigned to the asks together, by the Kuhn–Munkres optimum
  (synord.jobs.migration.assign_optimal), not one greedy choice at a time.

State it owns: the batch being gathered. The job's own state stays with the
consumer (its `_set_state`, `_progress`, `_save`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from synord.protocols.negotiation import Terms

from ..market.port import NoPlacement, PlacementRejected
from .migration import Displaced, Slot, assign_optimal

if TYPE_CHECKING:
    from .consumer import ConsumerJob, ConsumerJobs, Session

log = logging.getLogger("synord.jobs.placement")

BATCH_WINDOW_S = 0.25
RETRY_S = 0.5  # between rounds of proposals while no candidate agrees
DEFAULT_BANDWIDTH_BPS = 100 * 1024 * 1024  # assumed to a provider we have not measured yet


@dataclass
class _Displacement:
    job: "ConsumerJob"
    exclude: tuple[str, ...]
    done: trio.Event = field(default_factory=trio.Event)
    candidate: Any = None


class Placement:
    def __init__(self, jobs: "ConsumerJobs"):
        self.jobs = jobs  # the consumer driver: the market, the job's state, `_launch`
        self._displaced: list[_Displacement] = []
        self._batch_open = False
        self._batch_full = trio.Event()  # set when every displaced job has joined the batch

    async def place(self, job: "ConsumerJob", exclude: tuple[str, ...], preferred: Any = None) -> "Session":
        """Propose to the ranked candidates (the market hedges: a silent one does not
        hold up the next, and is backed off); fail with every answer after
        ``placement_timeout_s``."""
        jobs, market = self.jobs, self.jobs.market
        needs = job.jobspec.needs()
        if job.state == "migrating":
            jobs._progress(job, "placing", note="finding another provider")
        else:  # a first placement is quick, or `run` says it waits and why (placement_json)
            job.progress = {"phase": "placing", "done": None, "total": None}
            job.notify()
        if job.state != "migrating":
            jobs._set_state(job, "negotiating")
            await market.announce_bid(needs, job.id)
        deadline = trio.current_time() + jobs.placement_timeout_s
        reasons: list[str] = []
        while True:
            if job.cancel_requested:
                raise NoPlacement("cancelled")
            cands = market.candidates(needs, exclude)
            if preferred is not None:
                cands = [preferred] + [c for c in cands if c.ask.peer != preferred.ask.peer]
                preferred = None
            if cands:
                try:
                    terms = await market.negotiate_any(
                        cands, needs, within_s=max(1.0, deadline - trio.current_time()))
                except PlacementRejected as exc:
                    reasons.append(str(exc))
                    log.info("no candidate agreed", extra={"job": job.id, "reason": str(exc)})
                else:
                    try:
                        return await jobs._launch(job, terms)
                    except Exception as exc:
                        if "corrupted checkpoint" in str(exc) and job.checkpoint:
                            # The provider could not restore it: fall back to a clean restart.
                            log.warning("checkpoint refused by the provider: restarting from scratch",
                                        extra={"job": job.id, "error": str(exc)})
                            job.runstate.checkpoint = None
                            job.runstate.restore_mode = "restart"
                            jobs._save(job)
                        reasons.append(f"{terms.provider[:12]}: {exc}")
                        await market.abandon(terms, f"launch failed: {exc}")
                        log.warning("launch failed", extra={"job": job.id, "provider": terms.provider[:16],
                                                            "error": f"{type(exc).__name__}: {exc}"})
            if trio.current_time() >= deadline:
                why = "; ".join(reasons[-3:]) or market.explain(needs)
                raise NoPlacement(f"no provider took the task within {jobs.placement_timeout_s:g} s: {why}")
            await trio.sleep(RETRY_S)

    async def preplace(self, job: "ConsumerJob", exclude: tuple[str, ...], within_s: float) -> Terms | None:
        """Agree with the next provider while the task still runs, so the old one can
        send the checkpoint straight there."""
        market = self.jobs.market
        needs = job.jobspec.needs()
        with trio.move_on_after(within_s):
            preferred = await self.join_replacement(job, exclude)
            cands = market.candidates(needs, exclude)
            if preferred is not None:
                cands = [preferred] + [c for c in cands if c.ask.peer != preferred.ask.peer]
            for cand in cands:
                try:
                    return await market.negotiate(cand, needs)
                except PlacementRejected:
                    continue
        return None

    # ---- re-placement of displaced jobs, all at once --------------------------------------

    async def join_replacement(self, job: "ConsumerJob", exclude: tuple[str, ...]) -> Any:
        """Wait for the batch of jobs displaced at about the same time to be assigned
        together; returns this job's candidate (None: place it on its own)."""
        entry = _Displacement(job, exclude)
        self._displaced.append(entry)
        if not self._batch_open:
            self._batch_open = True
            self._batch_full = trio.Event()
            self.jobs._nursery.start_soon(self._assign_batch)
        if self._all_displaced_joined():
            self._batch_full.set()
        await entry.done.wait()
        return entry.candidate

    def _all_displaced_joined(self) -> bool:
        """Every job of ours still running on a provider that displaced one is in the
        batch: nothing more to wait for (a lone job is assigned at once)."""
        left = {p for e in self._displaced for p in e.exclude}
        joined = {e.job.id for e in self._displaced}
        return not any(j.state == "running" and j.provider in left and j.id not in joined
                       for j in self.jobs.jobs.values())

    async def _assign_batch(self) -> None:
        # Notices from one provider arrive together: wait for the others, at most the window.
        with trio.move_on_after(BATCH_WINDOW_S):
            await self._batch_full.wait()
        batch, self._displaced, self._batch_open = self._displaced, [], False
        try:
            self._assign(batch)
        finally:
            for entry in batch:
                entry.done.set()

    def _assign(self, batch: list[_Displacement]) -> None:
        market, bandwidth = self.jobs.market, self.jobs.bandwidth
        tasks, asks = [], {}
        for e in batch:
            needs = e.job.jobspec.needs()
            ck = e.job.checkpoint if e.job.runstate.restore_mode not in (None, "restart") else None
            tasks.append(Displaced(e.job.id, needs.cores, needs.memory, needs.runtime,
                                   ck["bytes"] if ck else 0, needs.max_price, e.exclude))
            for cand in market.candidates(needs, e.exclude):
                asks.setdefault((cand.ask.peer, cand.ask.id), cand)
        slots: list[Slot] = []
        owners: list[Any] = []
        smallest = min(batch, key=lambda e: e.job.jobspec.cpus).job.jobspec
        for cand in asks.values():
            a = cand.ask
            # How many tasks of this batch the ask can hold; each slot gets an equal share.
            n = int(min(a.cores / max(smallest.cpus, 1e-9), a.memory / max(smallest.memory_bytes, 1)))
            n = max(0, min(n, len(batch)))
            for _ in range(n):
                slots.append(Slot(a.peer, a.cores / n, a.memory // n, a.price,
                                  bandwidth.get(a.peer, DEFAULT_BANDWIDTH_BPS), tuple(a.runtimes)))
                owners.append(cand)
        t0 = time.perf_counter()
        result = assign_optimal(tasks, slots)
        solve_ms = (time.perf_counter() - t0) * 1000
        for e in batch:
            j = result.get(e.job.id)
            e.candidate = owners[j] if j is not None else None
            e.job.runstate.assignment = {"method": "kuhn-munkres", "batch": len(batch),
                                         "slots": len(slots), "solve_ms": round(solve_ms, 3),
                                         "provider": owners[j].ask.peer if j is not None else None}
        if len(batch) > 1:
            log.info("displaced jobs assigned together", extra={"jobs": len(batch), "slots": len(slots),
                                                                "solve_ms": round(solve_ms, 3)})
