"""Provider-side reservation of capacity: reserve, commit, release, expire.

A pool holds a resource vector (``cpus``, ``memory_bytes``, ``gpus``).
Every method is synchronous and the daemon runs on one trio thread, so a
check-and-take can never interleave with another: ten proposals for the same
capacity yield exactly one reservation and nine `InsufficientCapacity`
errors naming the short resource.

A reservation lives until its expiry unless committed (the agreement was
countersigned; then it lasts until the lease ends) or released.
"""

from __future__ import annotations

from dataclasses import dataclass

RESOURCES = ("cpus", "memory_bytes", "gpus")


class ReservationError(Exception):
    pass


class InsufficientCapacity(ReservationError):
    def __init__(self, resource: str, need: float, free: float):
        super().__init__(f"insufficient {resource}: need {need:g}, free {free:g}")
        self.resource, self.need, self.free = resource, need, free


@dataclass(slots=True)
class Reservation:
    key: str
    amounts: dict[str, float]
    expires: int
    committed: bool = False


def _vector(d: dict) -> dict[str, float]:
    out = {r: float(d.get(r, 0) or 0) for r in RESOURCES}
    for r, v in out.items():
        if v < 0:
            raise ValueError(f"{r} must be >= 0")
    return out


class CapacityPool:
    def __init__(self, capacity: dict):
        self._capacity = _vector(capacity)
        self._held: dict[str, Reservation] = {}

    @property
    def capacity(self) -> dict[str, float]:
        return dict(self._capacity)

    def set_capacity(self, capacity: dict) -> None:
        """New offerable capacity (limits changed, owner came back).  Existing
        reservations are kept; `free` may go negative until they end."""
        self._capacity = _vector(capacity)

    def used(self) -> dict[str, float]:
        used = dict.fromkeys(RESOURCES, 0.0)
        for res in self._held.values():
            for r, v in res.amounts.items():
                used[r] += v
        return used

    def free(self, now: int | None = None) -> dict[str, float]:
        if now is not None:
            self.expire(now)
        used = self.used()
        return {r: self._capacity[r] - used[r] for r in RESOURCES}

    def reserve(self, key: str, need: dict, now: int, ttl_ms: int) -> Reservation:
        if key in self._held:
            raise ReservationError(f"reservation {key} already exists")
        amounts = _vector(need)
        free = self.free(now)
        for r in RESOURCES:
            if amounts[r] > free[r] + 1e-9:
                raise InsufficientCapacity(r, amounts[r], max(0.0, free[r]))
        res = Reservation(key, amounts, now + ttl_ms)
        self._held[key] = res
        return res

    def commit(self, key: str, until: int) -> Reservation:
        res = self._held.get(key)
        if res is None:
            raise ReservationError(f"no reservation {key} (expired or released)")
        res.committed, res.expires = True, until
        return res

    def release(self, key: str) -> bool:
        return self._held.pop(key, None) is not None

    def get(self, key: str) -> Reservation | None:
        return self._held.get(key)

    def expire(self, now: int) -> list[str]:
        gone = [k for k, r in self._held.items() if r.expires <= now]
        for k in gone:
            del self._held[k]
        return gone

    def __len__(self) -> int:
        return len(self._held)
