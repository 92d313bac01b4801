"""The agreement's one lease (synord.protocols.lease), and the negotiation feeding it:
events in, states out; no sockets, no sleeps."""

import pytest

from synord.protocols.identity import Identity
from synord.protocols.lease import NEGOTIATION, TASK, Lease, LeaseError, LeaseState
from synord.protocols.negotiation import (CONSUMER, PROVIDER, Agreement, Countersign, Heartbeat, Negotiation,
                                   Propose, State, Terms)


def test_silence_past_the_timeout_is_lost():
    lease = Lease(3000, started=1000)
    assert lease.remaining_ms(1000) == 3000
    assert not lease.expire(3999)
    assert lease.expire(4000) and lease.state is LeaseState.LOST
    assert "no sign of life for 3 s" in lease.reason


def test_either_source_keeps_it_alive():
    lease = Lease(3000, started=0)
    lease.heard(TASK, 2000)
    lease.heard(NEGOTIATION, 4000)
    assert lease.deadline == 7000
    assert not lease.expire(6999)
    lease.heard(TASK, 6500)
    assert lease.deadline == 9500 and lease.last_heard == {TASK: 6500, NEGOTIATION: 4000}


def test_lost_stays_lost_and_unknown_sources_are_refused():
    lease = Lease(1000, started=0)
    assert lease.expire(1000)
    lease.heard(TASK, 1001)  # a late frame revives nothing
    assert lease.lost and lease.remaining_ms(1001) == 0
    with pytest.raises(LeaseError):
        lease.heard("gossip", 1)


def test_an_ended_lease_still_waits_for_the_streams_last_frames():
    lease = Lease(1000, started=0)
    lease.end("completed", 500)
    assert lease.state is LeaseState.ENDED
    lease.heard(TASK, 900)  # the exit frame crossing the End
    assert not lease.expire(1800)
    assert lease.expire(1900)


def test_limit_only_tightens():
    lease = Lease(6000, started=0)
    lease.limit(3000)
    lease.limit(10_000)
    lease.limit(0)
    assert lease.timeout_ms == 3000


def _active_pair(role=CONSUMER, heartbeat_ms=1000):
    """A negotiation of ``role`` that reached ACTIVE at time 0 (our machine, both sides' events)."""
    c_id, p_id = Identity.generate(), Identity.generate()
    nid = b"n" * 16
    prop = Propose(nid, p_id.peer_id, "a", 1, "b", 1, "cpu", 1.0, 1 << 20, "wasm", 1.0, 60)
    terms = Terms(b"a" * 16, nid, c_id.peer_id, p_id.peer_id, "a", 1, "b", 1, "cpu", 1.0, 1 << 20, 0, None,
                  "wasm", 1.0, 1.0, 60, heartbeat_ms, 0, 60_000)
    m = Negotiation(role, nid, c_id.peer_id, p_id.peer_id)
    ours, theirs = (m.send, m.receive) if role == CONSUMER else (m.receive, m.send)
    ours(prop, 0)
    theirs(Agreement(terms, terms.sign(p_id)), 0)
    ours(Countersign(nid, terms.aid, terms.sign(c_id)), 0)
    return m, nid


def test_the_negotiation_holds_the_agreements_lease():
    c, nid = _active_pair()
    assert c.state is State.ACTIVE and c.lease is not None
    assert c.lease.timeout_ms == 1000 * c.timeouts.missed_heartbeats
    c.receive(Heartbeat(nid, 1), 1000)
    assert c.lease.last_heard[NEGOTIATION] == 1000 and c.deadline == 4000


def test_task_frames_keep_the_negotiation_from_declaring_lost():
    c, nid = _active_pair()
    c.lease.heard(TASK, 2500)  # the job path heard the provider on the task stream
    assert c.check_timeout(3000) is None and c.deadline == 5500
    assert c.check_timeout(5500) is not None
    assert c.state is State.LOST and c.lease.lost  # one decision, both see it


def test_the_job_paths_tighter_limit_applies_to_the_negotiation_too():
    c, _ = _active_pair()
    c.lease.limit(2000)
    assert c.check_timeout(2000) is not None and c.state is State.LOST


def test_an_end_ends_the_lease():
    from synord.protocols.negotiation import End
    c, nid = _active_pair()
    c.receive(End(nid, "completed"), 100)
    assert c.lease.state is LeaseState.ENDED


def test_provider_side_too():
    p, _ = _active_pair(PROVIDER, heartbeat_ms=500)
    assert p.state is State.ACTIVE and p.lease.timeout_ms == 1500
    assert p.check_timeout(1500) is not None and p.lease.lost
