"""Who runs first on a busy provider: priorities and the preemptible flag (sans-IO).

Theory of operation
-------------------
Every proposal and every agreement carries a **priority** (``high``,
``normal``, ``batch``) and a **preemptible** flag, both signed into the
agreement's terms (synord.protocols.negotiation): what a running task may
suffer is what its consumer agreed to, not what the provider decides later.

When a proposal arrives and the provider's free capacity does not hold it,
`decide` is asked, given the free capacity, the need, the proposal's
priority and the tasks running under agreements:

    it fits                                            -> Admit
    it fits once some running tasks are gone, each of
    them preemptible AND of a lower priority           -> AdmitAfterPreempting(victims)
    otherwise                                          -> RefuseCapacity

A task whose agreement does not say preemptible is never a victim, whatever
the priority of the newcomer; a task is never displaced by an equal or lower
priority. Victims are chosen lowest priority first, then the most recently
started (the least work to move), and no more than needed. The provider then
hands each victim back through the normal migration path (a preemption
notice; its consumer's Handover moves it): nothing here kills a task.

No clocks, no I/O: the caller passes what runs and what is free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PRIORITIES = ("batch", "normal", "high")  # lowest first
RANK = {p: i for i, p in enumerate(PRIORITIES)}
DEFAULT_PRIORITY = "normal"
RESOURCES = ("cpus", "memory_bytes", "gpus")
_EPS = 1e-9


class PriorityError(ValueError):
    pass


def check_priority(value: Any) -> str:
    """A priority from a peer or a user: one of PRIORITIES, or PriorityError."""
    if not isinstance(value, str) or value not in RANK:
        raise PriorityError(f"priority must be one of {', '.join(PRIORITIES)}")
    return value


@dataclass(frozen=True)
class Running:
    """A task running under an agreement, as admission sees it."""
    key: Any  # the caller's handle (e.g. the reservation key)
    priority: str
    preemptible: bool
    need: dict  # {cpus, memory_bytes, gpus}
    started: int  # unix ms


@dataclass(frozen=True)
class Admit:
    pass


@dataclass(frozen=True)
class RefuseCapacity:
    detail: str


@dataclass(frozen=True)
class AdmitAfterPreempting:
    victims: tuple[Running, ...]


def fits(free: dict, need: dict) -> bool:
    return all(need.get(r, 0) <= free.get(r, 0) + _EPS for r in RESOURCES)


def decide(free: dict, need: dict, priority: str, running: list[Running]) -> Admit | RefuseCapacity | AdmitAfterPreempting:
    """What to do with a proposal of ``priority`` needing ``need`` (see the module docstring)."""
    if fits(free, need):
        return Admit()
    rank = RANK[priority]
    victims_ok = sorted((r for r in running if r.preemptible and RANK[r.priority] < rank),
                        key=lambda r: (RANK[r.priority], -r.started))
    room = dict(free)
    chosen: list[Running] = []
    for r in victims_ok:
        chosen.append(r)
        for k in RESOURCES:
            room[k] = room.get(k, 0) + r.need.get(k, 0)
        if fits(room, need):
            return AdmitAfterPreempting(tuple(chosen))
    if not victims_ok:
        return RefuseCapacity("full, and no running task may be preempted for a "
                              f"{priority}-priority proposal")
    return RefuseCapacity("full even after preempting every preemptible lower-priority task")
