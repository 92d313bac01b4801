"""The two billing rule sets and the ledger of a run.

``published`` (Synkti's rules, defects kept on purpose): a task is charged
once, at completion, the hourly price of the instance it is on at that moment
x (completion - its last start); time before a preemption is never charged,
idle instances cost nothing, a task that finishes with no instance costs 0,
co-located tasks each pay the whole instance price.

``honest``: every instance is charged from the moment it is held to the moment
it is released or terminated (a preempted spot instance runs to the end of its
grace period), whatever ran on it.

Every charge is one ledger line; the cost of a run is the sum of its ledger, so
"costs add up" is checkable line by line.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Charge:
    instance: str | None   # None: a task that finished on no instance (published defect)
    task: int | None       # None: an instance-hour charge (honest)
    start_h: float
    end_h: float
    price: float

    @property
    def amount(self) -> float:
        return self.price * (self.end_h - self.start_h)


class Ledger:
    def __init__(self, rules: str, keep: bool = True):
        self.rules = rules
        self.keep = keep          # the 100 000-task run keeps totals only
        self.lines: list[Charge] = []
        self.total = 0.0
        self.hours = 0.0

    def _add(self, c: Charge) -> None:
        self.total += c.amount
        if c.instance is not None:
            self.hours += c.end_h - c.start_h
        if self.keep:
            self.lines.append(c)

    def task_completed(self, task, inst, now: float) -> None:
        if self.rules == "published":
            if inst is None:
                self._add(Charge(None, task.id, task.start, now, 0.0))
            else:
                self._add(Charge(inst.id, task.id, task.start, now, inst.price))

    def instance_released(self, inst, now: float) -> None:
        if self.rules == "honest":
            self._add(Charge(inst.id, None, inst.held_since, now, inst.price))

    def cost_at(self, t: float) -> float:
        """Cost accrued by time t: honest charges accrue by the hour, published
        ones land at the task's completion."""
        if self.rules == "published":
            return sum(c.amount for c in self.lines if c.end_h <= t)
        return sum(c.price * max(0.0, min(t, c.end_h) - c.start_h) for c in self.lines)
