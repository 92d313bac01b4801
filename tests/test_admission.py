"""Priorities on a busy provider: the sans-IO decision (synord.protocols.admission),
the priority and preemptible flag in the signed agreement (checked on both sides),
and the market's provider party displacing only what its agreements allow."""

from __future__ import annotations

import dataclasses

import pytest

from synord.protocols import admission as adm
from synord.protocols.negotiation import BodyError, NegotiationError, Propose, Terms
from synord.market.negotiator import Consumer

from test_market_book import bid as mk_bid
from test_negotiation import C_ID, P_ID, T0, agreement, deliver, make_provider, pair, proposal

FULL = {"cpus": 0.0, "memory_bytes": 0, "gpus": 0}
ONE = {"cpus": 1.0, "memory_bytes": 1 << 30, "gpus": 0}


def running(key, priority, preemptible, started=T0, cpus=1.0):
    return adm.Running(key, priority, preemptible, {"cpus": cpus, "memory_bytes": 1 << 30, "gpus": 0}, started)


# ---- the decision -------------------------------------------------------------------------------

def test_room_left_admits_without_touching_anyone():
    assert adm.decide(ONE, ONE, "high", [running("b", "batch", True)]) == adm.Admit()


def test_a_full_provider_hands_back_a_preemptible_batch_task_for_a_higher_priority():
    for priority in ("high", "normal"):
        d = adm.decide(FULL, ONE, priority, [running("b", "batch", True)])
        assert isinstance(d, adm.AdmitAfterPreempting) and [v.key for v in d.victims] == ["b"]


def test_a_task_not_agreed_preemptible_is_never_displaced():
    d = adm.decide(FULL, ONE, "high", [running("b", "batch", False), running("n", "normal", False)])
    assert isinstance(d, adm.RefuseCapacity) and "no running task may be preempted" in d.detail


def test_never_for_an_equal_or_lower_priority():
    for newcomer, victim in [("batch", "batch"), ("normal", "normal"), ("normal", "high"), ("high", "high")]:
        assert isinstance(adm.decide(FULL, ONE, newcomer, [running("x", victim, True)]), adm.RefuseCapacity)


def test_victims_lowest_priority_then_youngest_and_no_more_than_needed():
    tasks = [running("old-batch", "batch", True, T0), running("young-batch", "batch", True, T0 + 5),
             running("normal", "normal", True, T0 + 9)]
    d = adm.decide(FULL, ONE, "high", tasks)
    assert [v.key for v in d.victims] == ["young-batch"]
    two = {"cpus": 2.0, "memory_bytes": 1 << 30, "gpus": 0}
    assert [v.key for v in adm.decide(FULL, two, "high", tasks).victims] == ["young-batch", "old-batch"]
    huge = {"cpus": 99.0, "memory_bytes": 1, "gpus": 0}
    assert "even after preempting" in adm.decide(FULL, huge, "high", tasks).detail


def test_priority_values_are_checked():
    for bad in ("urgent", "", None, 3, "HIGH"):
        with pytest.raises(adm.PriorityError):
            adm.check_priority(bad)


# ---- in the signed agreement ------------------------------------------------------------------------

def test_priority_and_preemptible_travel_in_the_proposal_and_only_when_not_default():
    p = proposal(priority="batch", preemptible=True)
    assert Propose.from_body(p.to_body()) == p
    assert "priority" not in proposal().to_body() and "preemptible" not in proposal().to_body()
    for field, bad in [("priority", "urgent"), ("priority", 1), ("preemptible", "yes"), ("preemptible", 1)]:
        with pytest.raises(BodyError, match=field):
            Propose.from_body({**proposal().to_body(), field: bad})


def test_the_signature_covers_priority_and_preemptible():
    t = dataclasses.replace(agreement().terms, priority="batch", preemptible=True)
    assert Terms.from_body(t.to_body()) == t
    assert t.signing_input() != agreement().terms.signing_input()


def test_a_provider_may_neither_demote_nor_make_preemptible_what_was_asked():
    for asked, given in [({}, dict(preemptible=True)), ({}, dict(priority="batch")),
                         (dict(priority="high"), {}), (dict(preemptible=True), dict(preemptible=False))]:
        c, _ = pair()
        c.send(proposal(**asked), T0)
        with pytest.raises(NegotiationError, match="priority"):
            c.receive(agreement(**given), T0)
    c, _ = pair()
    c.send(proposal(priority="batch", preemptible=True), T0)
    c.receive(agreement(priority="batch", preemptible=True), T0)  # as asked: fine


# ---- the provider party on a full provider -----------------------------------------------------------

class Tasks:
    """The provider's running tasks as the market sees them (ProviderJobs' two methods)."""

    def __init__(self):
        self.running: set[bytes] = set()
        self.notices: list[tuple[bytes, str]] = []

    def displaceable(self, aid: bytes) -> bool:
        return aid in self.running

    def displace(self, aid: bytes, reason: str) -> None:
        self.running.discard(aid)
        self.notices.append((aid, reason))


def _agree(prov, tasks, consumer, priority, preemptible, bid_id):
    parties = {P_ID.peer_id: prov, consumer.peer_id: consumer}
    log = deliver(consumer.place(mk_bid(bid_id, cores=4.0), [prov.asks["a1"]],
                                    priority=priority, preemptible=preemptible), parties)
    pl = consumer.placements[bid_id]
    if pl.state == "active":
        tasks.running.add(pl.negotiation.terms.aid)
    return pl, log


def test_a_full_provider_displaces_only_a_preemptible_lower_priority_agreement():
    from synord.protocols.identity import Identity
    tasks = Tasks()
    prov = make_provider(cores=4.0)
    prov.displacer = tasks
    batch, _ = _agree(prov, tasks, Consumer(C_ID), "batch", False, "b1")  # not preemptible
    assert batch.state == "active" and batch.negotiation.terms.priority == "batch"
    refused, log = _agree(prov, tasks, Consumer(Identity.generate()), "high", False, "b2")
    assert refused.state == "failed" and "capacity" in refused.explain() and not tasks.notices
    # The batch task ends; a preemptible one takes its place, then a high-priority one comes.
    deliver(prov.end(C_ID.peer_id, batch.negotiation.nid, "completed"), {C_ID.peer_id: Consumer(C_ID)})
    tasks.running.clear()
    victim, _ = _agree(prov, tasks, Consumer(C_ID), "batch", True, "b3")
    assert victim.state == "active" and victim.negotiation.terms.preemptible
    normal, _ = _agree(prov, tasks, Consumer(Identity.generate()), "normal", False, "b4")
    high, _ = _agree(prov, tasks, Consumer(Identity.generate()), "high", False, "b5")
    assert normal.state == "active"
    assert tasks.notices == [(victim.negotiation.terms.aid, "displaced by a normal-priority task")]
    assert prov.pool.free()["cpus"] == 0.0  # the newcomer holds the victim's room, not more
    # The normal task was not preemptible: the high one is refused, nothing else displaced.
    assert high.state == "failed" and len(tasks.notices) == 1


def test_the_victim_is_handed_back_only_once_the_newcomer_binds():
    from synord.protocols.identity import Identity
    from synord.market.negotiator import Provider
    from synord.market.reservations import CapacityPool
    from synord.protocols.envelope import now_ms
    from synord.protocols.negotiation import Timeouts
    from test_market_book import ask as mk_ask
    tasks = Tasks()
    slow_hb = Timeouts(propose_ms=1000, countersign_ms=2000, heartbeat_ms=60_000, missed_heartbeats=3)
    prov = Provider(P_ID, CapacityPool({"cpus": 4.0, "memory_bytes": 16 << 30}), timeouts=slow_hb)
    prov.offer(mk_ask("a1", cores=4.0, price=1.0, expires=now_ms() + 3_600_000, max_duration_s=86_400))
    prov.displacer = tasks
    victim, _ = _agree(prov, tasks, Consumer(C_ID, timeouts=slow_hb), "batch", True, "b1")
    key = f"{C_ID.peer_id}/{victim.negotiation.nid.hex()}"
    # A high-priority proposal is answered with an agreement, but never countersigned.
    newcomer = Consumer(Identity.generate(), timeouts=slow_hb)
    (propose,) = newcomer.place(mk_bid("b2", cores=4.0), [prov.asks["a1"]], "high", False)
    (answer,) = prov.receive(propose.envelope.encode())
    assert answer.envelope.type == "agreement" and not tasks.notices
    assert prov.pool.get(key) is None  # its room is held for the newcomer meanwhile
    prov.tick(now_ms() + slow_hb.countersign_ms + 100)  # the countersign deadline passes
    assert not tasks.notices and prov.pool.get(key).committed  # it keeps running, its room back
    assert prov.pool.free()["cpus"] == 0.0
    # A newcomer that binds: only now the notice goes out.
    bound, _ = _agree(prov, tasks, Consumer(Identity.generate(), timeouts=slow_hb), "high", False, "b3")
    assert bound.state == "active"
    assert tasks.notices == [(victim.negotiation.terms.aid, "displaced by a high-priority task")]
