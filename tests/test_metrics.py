"""/metrics after a job on a real mesh, parsed with prometheus_client.parser; the
optional metrics-only listener serves /metrics without the token and nothing else."""

from __future__ import annotations

import platform
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from synord import __version__

from daemons import wait_for
from jobs_helpers import PROBE_WASM, ensure_assets, start_mesh, wait_job

METRICS_LISTENER = '[metrics]\nlisten = "127.0.0.1:0"\n'


def _fetch(url: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, for every sample of every family."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_after_a_job_on_a_real_mesh(cluster):
    ensure_assets()
    consumer, (provider,) = start_mesh(cluster, 1, provider_config=METRICS_LISTENER)
    assert consumer.status()["metrics"] is None  # off by default
    metrics_url = provider.status()["metrics"]
    assert metrics_url and metrics_url.startswith("http://127.0.0.1:")

    res = consumer.cli("run", str(PROBE_WASM), "--", "hello")
    job = consumer.get("/v1/jobs")[0]
    assert wait_job(consumer, job["id"])["state"] == "succeeded", res.stderr

    api = consumer.client
    c = _samples(_fetch(api.url + "/metrics", api.token)[1])
    assert _value(c, "synord_placement_seconds_count") == 1
    assert 0 < _value(c, "synord_placement_seconds_sum") < 120
    assert _value(c, "synord_transfer_bytes_total") >= PROBE_WASM.stat().st_size
    for mode in ("full", "partial", "restart"):
        assert _value(c, "synord_migrations_total", mode=mode) == 0
    assert _value(c, "synord_capacity_offered", resource="cpus") == 0  # a consumer-only node
    build = [(dict(labels), v) for (name, labels), v in c.items() if name == "synord_build_info"]
    assert build == [({"version": __version__, "python": platform.python_version()}, 1.0)]
    assert _value(c, "process_resident_memory_bytes") > 10 << 20
    assert _value(c, "synord_jobs", state="succeeded") == 1

    # The provider, through the metrics-only listener: no token needed.
    status, text = _fetch(metrics_url + "/metrics")
    assert status == 200
    p = _samples(text)
    assert _value(p, "synord_sandbox_start_seconds_count", runtime="wasm") == 1
    assert _value(p, "synord_capacity_offered", resource="cpus") > 0
    assert _value(p, "synord_capacity_used", resource="cpus") == 0  # the task has ended
    assert _value(p, "synord_transfer_bytes_total") >= PROBE_WASM.stat().st_size
    assert _value(p, "synord_agreements_total") == 1
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families["synord_refusals"] == "counter" and families["synord_placement_seconds"] == "histogram"
    # earnings and spend follow the receipts once the job settles
    wait_for(lambda: _value(_samples(_fetch(metrics_url + "/metrics")[1]), "synord_earnings_total") > 0,
             30, what="the provider's earnings")
    wait_for(lambda: _value(_samples(_fetch(api.url + "/metrics", api.token)[1]), "synord_spend_total") > 0,
             30, what="the consumer's spend")

    # /metrics only: nothing else on that port, and the control API still wants its token.
    assert _fetch(metrics_url + "/v1/status")[0] == 404
    assert _fetch(api.url + "/metrics")[0] == 401

