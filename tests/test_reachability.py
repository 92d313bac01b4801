"""synord.protocols.reachability: AutoNAT votes -> status, scheduling, NAT type (no sockets)."""

import random

import pytest

from synord.protocols.reachability import (ERROR, FAILED, OK, PRIVATE, PUBLIC, REFUSED, UNKNOWN,
                                           Reachability)


def test_no_votes_is_unknown_and_a_round_is_due():
    r = Reachability()
    assert r.status(0) == UNKNOWN and r.confidence(0) == 0
    assert r.due(0)


def test_two_servers_that_reached_us_make_us_public():
    r = Reachability(min_votes=2)
    r.record("s1", OK, 1)
    assert r.status(1) == UNKNOWN  # one server is not enough
    r.record("s2", OK, 2)
    assert r.status(2) == PUBLIC and r.confidence(2) == 1.0


def test_failures_and_refusals_make_us_private_errors_do_not_count():
    r = Reachability(min_votes=2)
    r.record("s1", FAILED, 1)
    r.record("s2", ERROR, 1)  # no answer: says nothing about us
    assert r.status(1) == UNKNOWN
    r.record("s3", REFUSED, 2)  # none of our addresses matched what it saw: private only
    assert r.status(2) == PRIVATE
    # one server reaching us contradicts "private": unknown until a majority says public
    r.record("s4", OK, 3)
    assert r.status(3) == UNKNOWN
    r.record("s2", OK, 4); r.record("s5", OK, 4)
    assert r.status(4) == PUBLIC and r.confidence(4) == 0.6


def test_the_latest_vote_per_server_counts_and_old_votes_expire():
    r = Reachability(min_votes=2, vote_ttl_s=100)
    r.record("s1", FAILED, 0); r.record("s2", FAILED, 0)
    assert r.status(1) == PRIVATE
    r.record("s1", OK, 50); r.record("s2", OK, 50)  # the router got a port forward
    assert r.status(51) == PUBLIC
    assert r.status(151) == UNKNOWN  # stale: ask again
    r.record("s3", ERROR, 200)
    assert set(r.votes) == {"s3"}  # expired votes are dropped, not kept forever


def test_unknown_result_is_a_bug_not_a_vote():
    with pytest.raises(ValueError):
        Reachability().record("s", "maybe", 0)


def test_rounds_retry_fast_while_unknown_and_slowly_once_known():
    r = Reachability(min_votes=1, retry_s=20, recheck_s=300)
    cands = {"s1": "198.18.0.11"}
    assert r.plan(cands, 0) == ["s1"]
    assert r.plan(cands, 1) == []  # asked, no answer yet: not asked twice
    r.record("s1", ERROR, 2)
    assert r.plan(cands, 10) == [] and r.plan(cands, 20) == ["s1"]
    r.record("s1", OK, 21)
    assert r.status(21) == "public"
    assert r.plan(cands, 200) == [] and r.plan(cands, 320) == ["s1"]


def test_a_new_server_is_asked_at_once_while_unknown():
    r = Reachability(min_votes=2, retry_s=20)
    assert r.plan({"s1": "198.18.0.11"}, 0) == ["s1"]
    r.record("s1", OK, 1)
    # s2 connects a second later: no waiting for the retry interval
    assert r.plan({"s1": "198.18.0.11", "s2": "198.18.0.12"}, 2) == ["s2"]
    r.record("s2", OK, 3)
    assert r.status(3) == PUBLIC
    # known now: a third server waits for the recheck
    assert r.plan({"s1": "198.18.0.11", "s2": "198.18.0.12", "s3": "198.18.0.2"}, 4) == []


def test_servers_on_our_lan_or_behind_a_relay_are_not_asked():
    r = Reachability(max_servers=3)
    cands = {"lan": "192.168.1.11", "relayed": None, "lo": "127.0.0.1",
             "x": "198.18.0.11", "y": "198.18.0.12", "z": "198.18.0.2", "w": "8.8.8.8"}
    picked = r.pick_servers(cands, 0, random.Random(1))
    assert len(picked) == 3 and set(picked) <= {"x", "y", "z", "w"}
    # those without a live vote come first
    for p in ("x", "y", "z"):
        r.record(p, OK, 1)
    assert r.pick_servers(cands, 2, random.Random(1))[0] == "w"


def test_observed_addresses_only_public_ones_count():
    r = Reachability()
    r.observe("a", "/ip4/198.18.0.1/tcp/4001", 4001)
    r.observe("lan", "/ip4/192.168.1.10/tcp/4001", 4001)  # a LAN peer's view: not the internet's
    assert r.observed_addrs() == ["/ip4/198.18.0.1/tcp/4001"]
    r.forget_observer("a")
    assert r.observed_addrs() == []


def test_nat_type_guess():
    cone = Reachability()
    cone.observe("s1", "/ip4/198.18.0.1/tcp/41000", 41000)
    assert cone.nat_type() == UNKNOWN  # one observation
    cone.observe("s2", "/ip4/198.18.0.1/tcp/42000", 42000)
    assert cone.nat_type() == "cone"  # ports kept
    sym = Reachability()
    sym.observe("s1", "/ip4/198.18.0.3/tcp/61234", 41000)
    sym.observe("s2", "/ip4/198.18.0.3/tcp/17002", 42000)
    assert sym.nat_type() == "symmetric"
    same_socket = Reachability()  # one local socket, two external ports: symmetric for sure
    same_socket.observe("s1", "/ip4/198.18.0.3/tcp/5000", 4001)
    same_socket.observe("s2", "/ip4/198.18.0.3/tcp/5001", 4001)
    assert same_socket.nat_type() == "symmetric"
    public = Reachability()
    public.observe("s1", "/ip4/198.18.0.11/tcp/4001", 4001)
    assert public.nat_type(["198.18.0.11"]) == "none"


def test_report():
    r = Reachability(min_votes=1)
    r.record("s1", OK, 5, "/ip4/198.18.0.11/tcp/4001")
    j = r.to_json(6)
    assert j["status"] == PUBLIC and j["votes"][0]["server"] == "s1" and j["votes_ok"] == 1


def test_the_driver_sleeps_until_a_round_can_be_due():
    r = Reachability(retry_s=10, recheck_s=300, min_votes=1)
    assert r.wait_s(0) == 10  # nobody asked yet: a connecting peer wakes the driver sooner
    r.plan({"s1": "198.18.0.11"}, 100)
    assert r.wait_s(103) == 7
    r.record("s1", OK, 104)
    assert r.wait_s(104) == 296
    assert r.wait_s(1000) == 1.0  # overdue: soon, never a busy loop
