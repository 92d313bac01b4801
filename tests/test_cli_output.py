"""Readable CLI output: the formatting helpers alone, then the tables a person
reads from real daemons after a real job (sizes, times, CRD prices, peer ids
that differ), with every --json document still exactly the API's."""

from __future__ import annotations

import json
import re

import pytest

from daemons import DaemonCluster, wait_for
from jobs_helpers import PROBE_WASM, ensure_assets, start_mesh

from synord import humanize as hz


@pytest.mark.parametrize("n,text", [(0, "0 B"), (512, "512 B"), (1536, "1.5 KiB"), (200 << 20, "200 MiB"),
                                    (int(1.2 * 2**30), "1.2 GiB"), (None, "-"), (-2048, "-2.0 KiB")])
def test_size(n, text):
    assert hz.size(n) == text


@pytest.mark.parametrize("s,text", [(4.25, "4.2s"), (200, "3m 20s"), (7380, "2h 03m"), (93784, "1d 02h"),
                                    (59.6, "1m 00s"), (None, "-")])
def test_duration(s, text):
    assert hz.duration(s) == text


def test_money_has_a_unit_and_no_scientific_notation():
    assert hz.amount(-8.508339555555555e-08) == "-0.0000000851 CRD"
    assert hz.price(0.0012) == "0.00120 CRD/h"
    assert hz.price(3.5) == "3.50 CRD/h" and hz.amount(0) == "0 CRD"
    assert hz.price(1e9) == "any"  # a bid without a maximum
    assert "e-" not in hz.amount(1.5e-12)


def test_ago_takes_seconds_or_milliseconds():
    assert hz.ago(1000.0, now=1200.0) == "3m 20s ago"
    assert hz.ago(1_000_000_000_000, now=1_000_000_200.0) == "3m 20s ago"
    assert hz.ago(1300.0, now=1200.0) == "in 1m 40s" and hz.ago(None) == "-"


def test_short_ids_are_the_distinguishing_tail():
    a = "12D3KooWHVXCEjRFfUxKuti8ECqF8wKRF9mAsHRAn8KSeR3cykfo"
    b = "12D3KooWSbZA2efRmmwaded4Q2HC4HxmzozhvpPutFbmd7H8F9h5"
    c = "12D3KooWSbZA2efRmmwaded4Q2HC4HxmzozhvpPutFbmX7H8F9h5"  # the same last 7 characters as b
    short = hz.short_ids([a, b, c, None])
    assert short == {a: "…3cykfo", b: "…d7H8F9h5", c: "…X7H8F9h5"}
    assert hz.short_ids(["abc"]) == {"abc": "abc"}


def test_table_aligns_numbers_right():
    text = hz.table([["a", "1.5 GiB"], ["bb", "10 B"]], ["NAME", "SIZE"], right=(1,))
    assert text.splitlines() == ["NAME     SIZE", "a     1.5 GiB", "bb       10 B"]
    assert hz.table([], ["X"]) == "(none)"


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """A consumer and two providers after one finished wasm job."""
    ensure_assets()
    with DaemonCluster(tmp_path_factory.mktemp("cliout")) as cluster:
        consumer, provs = start_mesh(cluster, 2)
        res = consumer.cli("run", "--detach", "--json", str(PROBE_WASM), "--", "hello")
        job_id = json.loads(res.stdout)["id"]
        j = wait_for(lambda: (j := consumer.get(f"/v1/jobs/{job_id}"))["state"] == "succeeded" and j, 60,
                     what="the job done")
        aid = j["history"][0]["agreement"]
        wait_for(lambda: any(r["agreement_id"] == aid for r in consumer.get("/v1/ledger")["receipts"]), 20,
                 what="the receipt")
        yield consumer, provs, j


def test_job_is_a_readable_summary_and_json_is_the_api_document(ran):
    consumer, _, j = ran
    text = consumer.cli("job", j["id"]).stdout
    assert f"job        {j['id']}" in text and "state      succeeded (exit 0)" in text
    assert "placements" in text and "CRD/h" in text and "{" not in text
    assert json.loads(consumer.cli("job", j["id"], "--json").stdout) == consumer.get(f"/v1/jobs/{j['id']}")


def test_jobs_show_the_distinguishing_part_of_peer_ids(ran):
    consumer, provs, j = ran
    text = consumer.cli("jobs").stdout
    assert j["provider"][:20] not in text  # the shared "12D3KooW…" prefix tells nothing
    short = hz.short_ids([j["provider"]])[j["provider"]]
    assert short in text and "ago" in text
    assert json.loads(consumer.cli("jobs", "--json").stdout) == consumer.get("/v1/jobs")


def test_book_and_ledger_have_units_and_no_python_reprs(ran):
    consumer, _, j = ran
    book = consumer.cli("book").stdout
    assert "[cpu]" in book and "CRD/h" in book and ("GiB" in book or "MiB" in book)
    for repr_ in ("None", "{'", "':"):
        assert repr_ not in book
    assert json.loads(consumer.cli("book", "--json").stdout)["classes"].keys() == \
        consumer.get("/v1/book")["classes"].keys()
    ledger = consumer.cli("ledger").stdout
    first, *rest = ledger.splitlines()
    assert first.startswith("balance   -0.") and "CRD" in first and "e-" not in ledger
    row = next(r for r in rest if "completed" in r)
    assert "paid" in row and row.rstrip().endswith("CRD")
    doc = json.loads(consumer.cli("ledger", "--json").stdout)
    assert doc["balance"] == consumer.get("/v1/ledger")["balance"] < 0


def test_status_and_limits_read_like_prose(ran):
    _, provs, _ = ran
    status = provs[0].cli("status").stdout
    assert "contributing yes" in status and " s\n" not in status
    limits = provs[0].cli("limits").stdout
    assert "cpu_share" in limits and "100 %" in limits and "memory_share" in limits and "75 %" in limits
    assert re.search(r"daily_transfer_bytes +no limit", limits) and "task cache" in limits
