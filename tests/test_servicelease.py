"""The per-period renewal machine of a service (synord.protocols.servicelease) and the
checks of what a service asks for (synord.protocols.servicespec, volume names): no sockets."""

from __future__ import annotations

import pytest

from synord.protocols.identity import Identity
from synord.protocols.negotiation import Terms
from synord.protocols.receipts import Observed, ReceiptError, countersign, issue
from synord.protocols.servicelease import (Bill, ServiceLease, ServiceState, Stop, period_aid, period_terms)
from synord.protocols.servicespec import ServiceSpecError, VolumeError, check_service, parse_arg
from synord.protocols import taskstream as ts

P = 10_000  # a 10 s period
T0 = 1_700_000_000_000


def terms(provider: str = "prov", consumer: str = "cons", duration_s: int = 35) -> Terms:
    return Terms(aid=b"a" * 16, nid=b"n" * 16, consumer=consumer, provider=provider, ask_id="a", ask_seq=1,
                 bid_id="b", bid_seq=1, resource_class="cpu", cores=1.0, memory=1 << 28, gpus=0,
                 gpu_class=None, runtime="container", price=3.6, units=1.0, duration_s=duration_s,
                 heartbeat_ms=1000, created=T0, expires=T0 + duration_s * 1000)


def test_a_renewed_service_bills_each_period_and_stops_at_the_agreements_end():
    lease = ServiceLease(terms(), P)
    assert lease.last == 3  # 35 s: periods of 10, 10, 10 and 5 s
    assert lease.tick(T0 + 4_000) == []
    assert lease.due(T0 + 4_000) is None and lease.due(T0 + 5_000) == 1  # half-way into period 0
    assert lease.renewed(1) is None
    assert lease.tick(T0 + P) == [Bill(0, T0, T0 + P)]
    for k in (2, 3):
        assert lease.renewed(k) is None
    assert lease.tick(T0 + 3 * P) == [Bill(1, T0 + P, T0 + 2 * P), Bill(2, T0 + 2 * P, T0 + 3 * P)]
    assert lease.billed_until == T0 + 3 * P  # the short last period is the agreement's own receipt
    assert lease.due(T0 + 34_000) is None and lease.next_renewal(T0 + 34_000) is None
    assert lease.tick(T0 + 35_000) == [Stop("agreement_ended")]
    assert lease.state is ServiceState.STOPPED


def test_a_consumer_that_stops_renewing_gets_its_service_stopped_at_the_end_of_the_paid_period():
    lease = ServiceLease(terms(), P)
    assert lease.renewed(1) is None
    assert lease.tick(T0 + P + 1) == [Bill(0, T0, T0 + P)]
    assert lease.tick(T0 + 2 * P - 1) == []
    # period 2 never paid: period 1 is billed, then the service stops
    assert lease.tick(T0 + 2 * P) == [Bill(1, T0 + P, T0 + 2 * P), Stop("not_renewed")]
    assert lease.tick(T0 + 5 * P) == [] and lease.renewed(2) == "renewal_after_stop"


def test_renewals_a_peer_may_not_send_are_refused_and_change_nothing():
    lease = ServiceLease(terms(), P)
    assert lease.renewed(3) == "renewal_ahead"  # nobody prepays the whole agreement
    assert lease.renewed(0) == "bad_renewal" and lease.renewed(True) == "bad_renewal"
    assert lease.renewed("1") == "bad_renewal" and lease.renewed(4) == "renewal_past_agreement"
    assert lease.paid == 0
    assert lease.renewed(1) is None and lease.renewed(1) is None  # a resend: harmless
    assert lease.paid == 1 and lease.renewals == 1


def test_a_period_receipt_is_countersigned_only_once_its_window_was_observed():
    prov, cons = Identity.generate(), Identity.generate()
    t = terms(prov.peer_id, cons.peer_id)
    pt = period_terms(t, P, 1)
    assert pt.aid == period_aid(t.aid, 1) != period_aid(t.aid, 2) != t.aid
    assert (pt.created, pt.expires, pt.duration_s) == (T0 + P, T0 + 2 * P, 10)
    sr = issue(prov, pt, cpu_s=0.0, peak_memory=0, started=pt.created, ended=pt.expires)
    assert sr.receipt.amount == pytest.approx(3.6 * 10 / 3600)
    full = countersign(cons, sr, pt, Observed(pt.created, pt.expires + 100))
    assert full.csig is not None
    with pytest.raises(ReceiptError) as err:  # billed before the window ended, as we saw it
        countersign(cons, sr, pt, Observed(pt.created, pt.created + 2_000))
    assert err.value.slug == "over_observed"


def test_service_specs_and_volume_names_are_checked():
    s = check_service({"period_s": 2, "volumes": [{"name": "data", "path": "/data"}],
                       "health": {"cmd": ["true"], "interval_s": 1, "retries": 2}})
    assert s["period_s"] == 2.0 and s["health"]["cmd"] == ["true"]
    assert parse_arg("web-1_x:/srv/www") == {"name": "web-1_x", "path": "/srv/www"}
    for bad in ("../etc:/d", "Data:/d", ".x:/d", "a/b:/d", "", "a" * 64 + ":/d", "x:/proc/self",
                "x:/d/../etc", "x:relative", "x:/", "x:/a:b", "x:/data\x00"):
        with pytest.raises(VolumeError):
            parse_arg(bad)
    for bad in ({"period_s": 0.1}, {"period_s": float("nan")}, {"what": 1}, [],
                {"volumes": [{"name": "a", "path": "/a"}, {"name": "a", "path": "/b"}]},
                {"volumes": [{"name": "a", "path": "/a", "host": "/etc"}]},
                {"volumes": [{"name": f"v{i}", "path": f"/v{i}"} for i in range(5)]},
                {"health": {"cmd": ["true"], "tcp": 80}}, {"health": {"tcp": 0}},
                {"health": {"cmd": []}}, {"health": {"cmd": ["true"], "retries": 0}},
                {"health": {"tcp": 80, "interval_s": 0}}):
        with pytest.raises((ServiceSpecError, VolumeError)):
            check_service(bad)


def test_renew_and_service_frames_are_checked_by_the_task_stream_machine():
    assert ts.parse(ts.CONSUMER, {"renew": 2}) == ts.Renew(2)
    for bad in (0, -1, True, "2", 1 << 40):
        assert isinstance(ts.parse(ts.CONSUMER, {"renew": bad}), ts.Refused)
    ok = {"restarts": 1, "paid": 3, "volumes": {"data": 12}}
    assert ts.parse(ts.PROVIDER, {"service": ok}) == ts.ServiceInfo(1, 3, {"data": 12})
    for bad in ({**ok, "restarts": -1}, {**ok, "volumes": {"../x": 1}}, {**ok, "volumes": {"d": "1"}},
                {"paid": 1, "volumes": {}}, "x"):
        assert isinstance(ts.parse(ts.PROVIDER, {"service": bad}), ts.Refused)


def test_volumes_live_per_consumer_under_the_home_and_travel_as_a_checked_tar(tmp_path):
    from synord.volumes import Volumes
    vols = Volumes(tmp_path / "volumes", quota_bytes=1000)
    a = vols.path("consumer-a", "data")
    assert a.is_relative_to(tmp_path / "volumes") and "consumer-a" not in str(a)
    assert vols.path("consumer-b", "data") != a
    (a / "f").write_bytes(b"x" * 600)
    assert vols.sizes("consumer-a", ["data", "none"]) == {"data": 600, "none": 0}
    with pytest.raises(VolumeError) as err:
        vols.check_quota("consumer-a", 500)
    assert err.value.slug == "volume_quota"
    sha, size = vols.pack("consumer-a", "data", tmp_path / "v.tar")
    vols.restore("consumer-c", "data", tmp_path / "v.tar", sha)
    assert (vols.path("consumer-c", "data") / "f").read_bytes() == b"x" * 600
    with pytest.raises(Exception):
        vols.restore("consumer-c", "data", tmp_path / "v.tar", "0" * 64)
    with pytest.raises(VolumeError):
        vols.path("consumer-a", "../../etc")
