"""Prometheus metrics, prometheus-client conventions (``_total`` counters,
``_seconds``/``_bytes`` units, ``_info``, process_* from ProcessCollector).

Most series are read from the node's live state at scrape time (no counters to
keep in sync: the components already count). Latencies are events, so they are
real histograms observed where they happen (`observe_placement`,
`observe_sandbox_start`). An optional second listener (`[metrics] listen`)
serves /metrics alone, without the control token, for a Prometheus on the LAN.
"""

from __future__ import annotations

import platform
import time
from collections import Counter
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client import Counter as CounterMetric
from prometheus_client import PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from synord.protocols.pacing import PACER
from synord.protocols.refusals import REFUSALS

if TYPE_CHECKING:
    from .daemon import Node

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# One daemon per process: the events are process-wide, registered in the node's registry.
PLACEMENT = Histogram("synord_placement_seconds", "job submitted -> first task running on a provider",
                      registry=None, buckets=_LATENCY_BUCKETS)
SANDBOX_START = Histogram("synord_sandbox_start_seconds", "task accepted -> its sandbox running, by sandbox",
                          ["runtime"], registry=None, buckets=_LATENCY_BUCKETS)
MIGRATIONS = CounterMetric("synord_migrations", "tasks moved to another provider, by checkpoint mode",
                           ["mode"], registry=None)
for _mode in ("full", "partial", "restart"):  # jobs.migration.decide_mode
    MIGRATIONS.labels(_mode)


def observe_placement(submitted_at: float, mode: str) -> None:
    """A task started on a provider: its first placement, or a migration (``mode``)."""
    if mode == "initial":
        PLACEMENT.observe(max(0.0, time.time() - submitted_at))
    else:
        MIGRATIONS.labels(mode).inc()


def observe_sandbox_start(runtime: str, seconds: float) -> None:
    SANDBOX_START.labels(runtime).observe(max(0.0, seconds))


class NodeCollector:
    def __init__(self, node: "Node"):
        self.node = node

    def collect(self) -> Iterator:
        n = self.node
        peers = GaugeMetricFamily("synord_peers", "peers in this node's peer table")
        peers.add_metric([], len(n.mesh.peers_json()) if n.mesh else 0)
        yield peers

        rejected = CounterMetricFamily("synord_envelopes_rejected", "envelopes refused, by where and why",
                                       labels=["where", "reason"])
        sources = {"gossip": n.mesh.validator.rejected if n.mesh else {},
                   "market": n.market.validator.rejected if n.market else {}}
        for where, counts in sources.items():
            for reason, count in sorted(counts.items()):
                rejected.add_metric([where, reason], count)
        yield rejected

        refusals = CounterMetricFamily("synord_refusals", "requests refused (peer or local), by where and why",
                                       labels=["where", "reason"])
        for (where, reason), count in sorted(REFUSALS.snapshot().items()):
            refusals.add_metric([where, reason], count)
        yield refusals

        jobs = GaugeMetricFamily("synord_jobs", "jobs this node submitted, by state", labels=["state"])
        states = Counter(j.state for j in n.consumer_jobs.jobs.values()) if n.consumer_jobs else Counter()
        for state, count in sorted(states.items()):
            jobs.add_metric([state], count)
        yield jobs

        running = GaugeMetricFamily("synord_tasks_running", "tasks this node runs for others")
        running.add_metric([], len(n.provider_jobs.running()) if n.provider_jobs else 0)
        yield running

        agreements = CounterMetricFamily("synord_agreements", "agreements signed as a provider")
        agreements.add_metric([], n.market.agreements if n.market else 0)
        yield agreements

        paced = CounterMetricFamily("synord_transfer_paced_seconds",
                                    "time transfers were held back by the contributor's bandwidth cap")
        paced.add_metric([], PACER.waited_s)
        yield paced

        contributing = GaugeMetricFamily("synord_contributing", "1 when offering capacity")
        contributing.add_metric([], 1.0 if n.contributor.contributing else 0.0)
        yield contributing

        from . import __version__
        info = InfoMetricFamily("synord_build", "the running synord")
        info.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield info

        moved = CounterMetricFamily("synord_transfer_bytes", "artefact and checkpoint bytes sent or "
                                    "received over the mesh (through the bandwidth cap)")
        moved.add_metric([], PACER.bytes_total)
        yield moved

        if n.market is not None:
            earned, paid = n.market.ledger.totals()
            earnings = CounterMetricFamily("synord_earnings", "credits earned as a provider (receipts)")
            earnings.add_metric([], earned)
            yield earnings
            spend = CounterMetricFamily("synord_spend", "credits paid as a consumer (receipts)")
            spend.add_metric([], paid)
            yield spend

        offered = GaugeMetricFamily("synord_capacity_offered", "capacity offered to the market now",
                                    labels=["resource"])
        used = GaugeMetricFamily("synord_capacity_used", "capacity taken by the tasks running here",
                                 labels=["resource"])
        offer = n.contributor.market_offer() if n.profile is not None and n.contributor.contributing else {}
        running = n.provider_jobs.running() if n.provider_jobs else []
        for resource in ("cpus", "memory_bytes"):
            offered.add_metric([resource], float(offer.get(resource) or 0))
            used.add_metric([resource], float(sum(getattr(t.execution.spec.limits, resource)
                                                  for t in running)))
        yield offered
        yield used


def registry_for(node: "Node") -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(NodeCollector(node))
    for event in (PLACEMENT, SANDBOX_START, MIGRATIONS):
        registry.register(event)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


async def serve(node: "Node", listen: str, task_status) -> None:
    """The metrics-only listener: GET /metrics, no token, nothing else (404)."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from .api import serve_app

    async def metrics(request):
        return Response(generate_latest(node.metrics_registry), media_type=CONTENT_TYPE_LATEST)

    await serve_app(Starlette(routes=[Route("/metrics", metrics, methods=["GET"])]), listen, task_status)
