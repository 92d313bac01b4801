"""Prometheus metrics, read from the node's live state at scrape time (no
counters to keep in sync: the components already count)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from protocols.refusals import REFUSALS

if TYPE_CHECKING:
    from .daemon import Node


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

        from protocols.pacing import PACER
        paced = CounterMetricFamily("synord_transfer_paced_seconds",
                                    "time transfers were held back by the contributor's bandwidth cap")
        paced.add_metric([], PACER.waited_s)
        yield paced

        contributing = GaugeMetricFamily("synord_contributing", "1 when offering capacity")
        contributing.add_metric([], 1.0 if n.contributing else 0.0)
        yield contributing


def registry_for(node: "Node") -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(NodeCollector(node))
    return registry
