"""The market's placement port: what jobs ask of the market, in types both sides import.

Jobs (synord.jobs) place work through a `Market`; the market component
(synord.market.service) implements it. Both import this module and neither
imports the other, so the market never depends on jobs.

`Needs` is what the market sees of a job (a `JobSpec`'s `needs()`): cores,
memory, runtime, price cap and how long to hold the capacity. Its field names
are the market's (``cores``, ``memory``) since they go on the wire as a `Bid`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from synord.protocols.negotiation import Terms

if TYPE_CHECKING:
    from synord.protocols.lease import Lease


class NoPlacement(Exception):
    """No provider took the task within the placement deadline (the job fails with this)."""


class PlacementRejected(Exception):
    """A candidate said no (the market raises this from negotiate)."""


class HoldRefused(PlacementRejected):
    """A gang member did not hold (``reason``: a slug, never the peer's text)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Needs:
    runtime: str
    cores: float
    memory: int
    max_price: float | None
    duration_s: int
    gpus: int = 0
    gpu_class: str | None = None
    resource_class: str = "cpu"
    gpu_memory: int | None = None  # bytes on each GPU
    cuda: str | None = None  # least CUDA compute capability
    ports: tuple[int, ...] = ()  # TCP ports the task exposes (synord forward): in the signed terms


class Market(Protocol):
    """What jobs need from the market component (synord.market.service)."""

    def candidates(self, needs: Needs, exclude: tuple[str, ...] = ()) -> list[Any]: ...
    def explain(self, needs: Needs) -> str: ...
    async def negotiate(self, candidate: Any, needs: Needs) -> Terms: ...
    async def negotiate_any(self, candidates: list[Any], needs: Needs, within_s: float | None = None) -> Terms: ...
    def observed_end(self, terms: Terms, at_ms: int | None = None) -> None: ...
    async def announce_bid(self, needs: Needs, bid_id: str) -> None: ...
    async def abandon(self, terms: Terms, reason: str) -> None: ...
    def lease_done(self, terms: Terms) -> None: ...
    def lease(self, terms: Terms) -> "Lease | None": ...
    def expect_receipt(self, terms: Terms, ended_ms: int | None = None) -> None: ...
    def forget_receipt(self, terms: Terms) -> None: ...  # a service period cut short (jobs.service_client)
