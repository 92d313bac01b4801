"""Gangs (`synord run --nodes N`) on real daemons: all members start and their
output comes back marked; one member refusing means nothing starts, nothing
is charged and the others are free at once; two consumers racing for
overlapping gangs both finish, never on one provider at the same time.

The mesh: consumers c1 and c2, providers p0, p1, p2; p2 refuses c1 (its
deny list), so c1 can only ever have p0 and p1. Every member asks for a
provider's whole offer, so a provider holds one member at a time."""

from __future__ import annotations

import json

import pytest

from daemons import DaemonCluster, wait_for
from jobs_helpers import BUSYBOX_TAR, CONSUMER_ONLY, asks_at, ensure_assets, job, providers_in_book, submit, wait_job


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    ensure_assets()
    with DaemonCluster(tmp_path_factory.mktemp("gangs")) as cluster:
        c1 = cluster.start("c1", config=CONSUMER_ONLY)
        boot = c1.p2p_addrs()
        c1_id = c1.status()["peer_id"]
        provs = [cluster.start(f"p{i}", bootstrap=boot) for i in range(2)]
        provs.append(cluster.start("p2", bootstrap=boot, config=f'[market]\ndeny_peers = ["{c1_id}"]\n'))
        c2 = cluster.start("c2", bootstrap=boot, config=CONSUMER_ONLY)
        ids = {p.status()["peer_id"] for p in provs}
        for c in (c1, c2):
            wait_for(lambda c=c: providers_in_book(c) >= ids, 40, what="every provider's ask in the book")
        cpus = min(a["cores"] for a in asks_at(c1) if a["peer"] in ids)
        yield c1, c2, provs, f"{cpus:g}", cluster


def _ledger_size(d) -> int:
    return len(d.get("/v1/ledger")["receipts"])


def test_a_three_node_gang_starts_everywhere_and_every_line_comes_back_marked(mesh):
    _, c2, provs, cpus, _ = mesh
    script = 'echo "rank=$SYNORD_GANG_RANK size=$SYNORD_GANG_SIZE"; echo "$SYNORD_GANG_MEMBERS"'
    res = c2.cli("run", "--json", "--nodes", "3", "--cpus", cpus, "--runtime", "container", str(BUSYBOX_TAR),
                 "--", "sh", "-c", script, check=False, timeout=180)
    assert res.returncode == 0, res.stderr
    items = [json.loads(line) for line in res.stdout.splitlines()]
    data = [i for i in items if "data" in i]
    assert {i["member"] for i in data} == {0, 1, 2}
    by_rank: dict[int, str] = {}
    for i in data:
        by_rank[i["member"]] = by_rank.get(i["member"], "") + i["data"]
    provider_ids = sorted(p.status()["peer_id"] for p in provs)
    for rank, text in by_rank.items():
        first, roster = text.splitlines()
        assert first == f"rank={rank} size=3"
        roster = json.loads(roster)  # every member learns every member, ranked by peer id
        assert [m["peer"] for m in roster] == provider_ids and [m["rank"] for m in roster] == [0, 1, 2]
        assert all(m["addrs"] and all(a.endswith("/p2p/" + m["peer"]) for a in m["addrs"]) for m in roster)
    assert items[-1]["exit_code"] == 0 and items[-1]["state"] == "succeeded"
    gang_id = next(j["id"] for j in c2.get("/v1/jobs") if (j.get("gang") or {}).get("size") == 3)
    status = json.loads(c2.cli("status", gang_id, "--json").stdout)
    members = status["members"]
    assert [m["rank"] for m in members] == [0, 1, 2] and all(m["state"] == "succeeded" for m in members)
    assert sorted(m["provider"] for m in members) == provider_ids  # three distinct providers
    # The human view marks every line with its member.
    lines = c2.cli("logs", gang_id).stdout.splitlines()
    assert sorted(ln for ln in lines if "rank=" in ln) == [f"[{r}] rank={r} size=3" for r in range(3)]
    # Each member is an ordinary job with its own receipt.
    for m in members:
        aid = job(c2, m["job"])["history"][0]["agreement"]
        wait_for(lambda aid=aid: any(r["agreement_id"] == aid for r in c2.get("/v1/ledger")["receipts"]), 20,
                 what="a member's receipt")


def test_one_member_refusing_starts_nothing_charges_nothing_and_frees_the_others_at_once(mesh):
    c1, _, provs, cpus, _ = mesh
    before = {d: (_ledger_size(d), len(d.get("/v1/jobs")), d.get("/v1/book")["agreements"]) for d in provs}
    c1_receipts = _ledger_size(c1)
    res = c1.cli("run", "--nodes", "3", "--cpus", cpus, "--runtime", "container", str(BUSYBOX_TAR),
                 "--", "sh", "-c", "echo should not run", check=False, timeout=120)
    assert res.returncode != 0 and "should not run" not in res.stdout
    assert "only 2 of 3 providers would take it" in res.stderr and "admission" in res.stderr
    jobs = c1.get("/v1/jobs")
    gang = next(j for j in jobs if (j.get("gang") or {}).get("size") == 3)
    assert gang["state"] == "failed"
    assert not [j for j in jobs if (j.get("gang") or {}).get("parent") == gang["id"]]  # no member job
    # Nothing started, nothing countersigned, nothing charged.
    assert {d: (_ledger_size(d), len(d.get("/v1/jobs")), d.get("/v1/book")["agreements"]) for d in provs} == before
    assert _ledger_size(c1) == c1_receipts
    # p0 and p1 were released at once (not after their hold's timeout): a gang right
    # after gets both without one saying it is full, though each holds one member only.
    res = c1.cli("run", "--json", "--nodes", "2", "--cpus", cpus, "--runtime", "container", str(BUSYBOX_TAR),
                 "--", "sh", "-c", "echo ok", check=False, timeout=120)
    assert res.returncode == 0, res.stderr
    second = next(j for j in c1.get("/v1/jobs") if (j.get("gang") or {}).get("size") == 2)
    assert second["state"] == "succeeded"
    # (p2 may have been asked first and refused again: that is its deny list, not a hold.)
    assert "capacity" not in second["gang"]["refusals"].values(), second["gang"]


def test_two_consumers_racing_for_overlapping_gangs_never_deadlock_nor_double_book(mesh):
    c1, c2, provs, cpus, _ = mesh
    # Each member prints the host's uptime when it starts and when it ends (the one
    # clock every sandbox on this machine shares).
    script = "cut -d' ' -f1 /proc/uptime; sleep 2; cut -d' ' -f1 /proc/uptime"
    args = ("--nodes", "2", "--cpus", cpus, "--runtime", "container", str(BUSYBOX_TAR), "--", "sh", "-c", script)
    ids = {c1: submit(c1, *args), c2: submit(c2, *args)}
    spans: dict[str, list[tuple[float, float, str]]] = {}
    for c, gid in ids.items():
        g = wait_job(c, gid, timeout=150)
        assert g["state"] == "succeeded", g  # no deadlock: both gangs placed and done
        members = json.loads(c.cli("status", gid, "--json").stdout)["members"]
        assert len({m["provider"] for m in members}) == 2
        for m in members:
            start, end = (float(x) for x in c.cli("logs", m["job"]).stdout.split())
            spans.setdefault(m["provider"], []).append((start, end, gid))
    # No double booking: on each provider the two gangs' members never ran at once.
    for provider, runs in spans.items():
        runs.sort()
        for (s1, e1, g1), (s2, e2, g2) in zip(runs, runs[1:]):
            assert e1 <= s2, f"{provider[:12]} ran {g1} and {g2} at once"


def test_a_bad_node_count_is_one_line_and_reserves_nothing(mesh):
    c1 = mesh[0]
    before = len(c1.get("/v1/jobs"))
    for bad in ("0", "17"):
        res = c1.cli("run", "--nodes", bad, "--runtime", "container", str(BUSYBOX_TAR), "--", "true", check=False)
        assert res.returncode != 0
        assert res.stderr.strip().splitlines() == ["synord: bad task: nodes must be an integer from 1 to 16"]
    assert len(c1.get("/v1/jobs")) == before


def test_member_lines_are_marked_and_never_mixed_when_output_arrives_mid_line(capfdbinary):
    from synord import cli
    cli._PARTIAL.clear()
    for member, data in ((0, "a1\na"), (1, "b1\n"), (0, "2 still a2\n"), (1, "b2"), (1, "\nb3")):
        cli._write_output({"stream": "stdout", "data": data, "member": member})
    cli._flush_partial()  # the end: a line that never ended still comes out
    assert capfdbinary.readouterr().out == b"[0] a1\n[1] b1\n[0] a2 still a2\n[1] b2\n[1] b3"


def test_a_gang_survives_its_consumer_restarting(mesh):  # last: c2 is a new process after it
    c1, c2, _, cpus, cluster = mesh
    gid = submit(c2, "--nodes", "2", "--cpus", cpus, "--runtime", "container", str(BUSYBOX_TAR), "--",
                 "sh", "-c", "echo start; sleep 4; echo end")
    wait_for(lambda: c2.cli("logs", gid).stdout.count("start") == 2, 60, what="both members started")
    c2.kill()  # SIGKILL: nothing graceful
    c2 = cluster.start("c2", bootstrap=c1.p2p_addrs())  # the same home: its jobs, its identity
    g = wait_job(c2, gid, timeout=120)
    assert g["state"] == "succeeded" and g["exit_code"] == 0, g
    lines = sorted(c2.cli("logs", gid).stdout.splitlines())
    assert lines == ["[0] end", "[0] start", "[1] end", "[1] start"]  # every line once, marked
    for m in json.loads(c2.cli("status", gid, "--json").stdout)["members"]:
        assert len(job(c2, m["job"])["history"]) == 1  # re-attached, not re-placed
