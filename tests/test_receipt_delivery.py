"""Receipt delivery (synord.protocols.receipt_delivery): send, resend with back-off,
ack, give up; and the negotiator driving it.  Events in, no sockets or sleeps."""

import pytest

from synord.protocols.receipt_delivery import (RECEIPT_RESEND_FIRST_MS, RECEIPT_RESEND_FOR_MS, RECEIPT_RESEND_MAX_MS,
                                        DeliveryError, ReceiptDeliveries, State, Delivery, Due)

A, B = b"a" * 16, b"b" * 16


def test_resends_back_off_to_the_maximum():
    d = ReceiptDeliveries()
    d.issue(A, 0)
    times, now = [], 0
    while len(times) < 8:
        now = d.next_deadline()
        resend, gave_up = d.tick(now)
        assert resend == [A] and gave_up == []
        times.append(now)
    gaps = [b - a for a, b in zip([0] + times, times)]
    assert gaps[:6] == [2_000, 4_000, 8_000, 16_000, 32_000, 60_000]
    assert max(gaps) == RECEIPT_RESEND_MAX_MS


def test_nothing_goes_out_before_it_is_due():
    d = ReceiptDeliveries()
    d.issue(A, 1000)
    assert d.tick(1000 + RECEIPT_RESEND_FIRST_MS - 1) == ([], [])
    assert d.tick(1000 + RECEIPT_RESEND_FIRST_MS) == ([A], [])


def test_an_ack_stops_the_resends():
    d = ReceiptDeliveries()
    d.issue(A, 0)
    d.issue(B, 0)
    assert d.ack(A) is True and A not in d and len(d) == 1
    assert d.ack(A) is False  # a duplicate (or forged) ack for what is not pending
    assert d.tick(10_000) == ([B], [])


def test_it_gives_up_after_the_hour():
    d = ReceiptDeliveries()
    d.issue(A, 0)
    gave = []
    while d.next_deadline() is not None:
        resend, gave_up = d.tick(d.next_deadline())
        gave += gave_up
    assert gave == [A] and A not in d


def test_a_receipt_from_before_a_restart_is_due_now_and_keeps_its_give_up_time():
    d = ReceiptDeliveries()
    d.resume(A, first_sent=0, now=RECEIPT_RESEND_FOR_MS - 10)
    assert d.tick(RECEIPT_RESEND_FOR_MS - 10) == ([A], [])
    assert d.tick(d.next_deadline()) == ([], [A])


def test_illegal_events():
    with pytest.raises(DeliveryError):
        Delivery().process(Due(0), 1, 1, 1)  # nothing issued
    dv = Delivery()
    from synord.protocols.receipt_delivery import Issue
    dv.process(Issue(0), 2000, 60_000, 3_600_000)
    with pytest.raises(DeliveryError, match="not due"):
        dv.process(Due(1), 2000, 60_000, 3_600_000)
    assert dv.state is State.PENDING


def test_the_negotiator_resends_through_it():
    """The provider party's tick resends an unacknowledged receipt on this schedule."""
    from synord.market.negotiator import Provider
    from synord.market.reservations import CapacityPool
    from synord.protocols.identity import Identity
    from synord.protocols.receipts import issue
    from synord.protocols.negotiation import Terms

    me, consumer = Identity.generate(), Identity.generate()
    now = [0]
    prov = Provider(me, CapacityPool({"cpus": 4.0, "memory_bytes": 1 << 30}), clock=lambda: now[0])
    terms = Terms(A, B, consumer.peer_id, me.peer_id, "a", 1, "b", 1, "cpu", 1.0, 1 << 20, 0, None,
                  "wasm", 1.0, 1.0, 60, 1000, 0, 60_000)
    sr = issue(me, terms, cpu_s=1.0, peak_memory=1, started=0, ended=1000, outcome="completed")
    prov.resume_receipt(sr, first_sent=0)
    sends = prov.tick(0)
    assert [s.envelope.type for s in sends] == ["receipt"] and sends[0].to == consumer.peer_id
    assert prov.next_deadline() == 4_000
    now[0] = RECEIPT_RESEND_FOR_MS + 1
    while (at := prov.next_deadline()) is not None:
        prov.tick(at)
    assert prov._unacked == {}
