"""The gang machine (synord.protocols.gang) without sockets: the member table,
all-or-nothing commit, release at once on a lost race, expiry, idempotent
retries, two coordinators racing for shared members under many seeded random
interleavings (no deadlock, no double booking), and a member's hold on the
real negotiation parties (held uncountersigned, committed, released, lapsed)."""

from __future__ import annotations

import heapq
import random

import pytest

from synord.market.negotiator import Consumer
from synord.protocols import gang as g
from synord.protocols.envelope import now_ms
from synord.protocols.identity import Identity

from test_market_book import bid as mk_bid
from test_negotiation import C_ID, P_ID, TO, deliver, make_provider

A, B, C, D = "peerA", "peerB", "peerC", "peerD"
AID = [bytes([i]) * 16 for i in range(16)]


def test_all_held_commits_every_member_in_rank_order():
    gang = g.Gang(3, [C, A, B, D], deadline=60_000, seed=1)
    out = gang.start(0)
    assert out == [g.Reserve(A), g.Reserve(B), g.Reserve(C)]  # the best three, in peer-id order
    assert gang.held(C, AID[0], 5_000, 10) == []
    assert gang.held(A, AID[1], 5_000, 11) == []
    assert gang.held(B, AID[2], 5_000, 12) == [g.Commit(A), g.Commit(B), g.Commit(C)]
    assert gang.phase is g.Phase.COMMITTED and gang.rounds == 1
    assert [(m.rank, m.peer, m.state) for m in gang.ranked()] == [
        (0, A, g.State.COMMITTED), (1, B, g.State.COMMITTED), (2, C, g.State.COMMITTED)]


def test_a_refusal_releases_every_other_member_at_once_and_a_lasting_one_drops_the_peer():
    gang = g.Gang(3, [A, B, C, D], deadline=60_000, seed=1)
    gang.start(0)
    gang.held(A, AID[0], 5_000, 10)  # held; B still asked
    out = gang.refused(C, "admission", 20)
    assert out == [g.Release(A), g.Release(B)]  # the held one and the one still in flight, same instant
    assert gang.phase is g.Phase.BACKOFF and gang.wake > 20
    t = gang.wake
    assert gang.tick(t) == [g.Reserve(A), g.Reserve(B), g.Reserve(D)]  # C is never asked again
    assert gang.refused(D, "price", t + 5) == [g.Release(A), g.Release(B)]
    assert gang.phase is g.Phase.FAILED and "only 2 of 3" in gang.reason
    assert all(m.state is not g.State.HELD for m in gang.members.values())


def test_a_busy_member_goes_to_the_back_and_the_next_round_tries_the_others():
    gang = g.Gang(2, [A, B, C], deadline=60_000, seed=2)
    gang.start(0)
    gang.refused(A, "capacity", 5)
    assert gang.tick(gang.wake) == [g.Reserve(B), g.Reserve(C)]


def test_it_waits_while_busy_providers_are_gone_from_the_book_and_fails_only_on_lasting_refusals():
    gang = g.Gang(2, [A, B, C], deadline=60_000, seed=7)
    gang.start(0)
    gang.refused(A, "capacity", 5)
    gang.update_candidates([B])  # A and C are busy: their asks left the book
    t = gang.wake
    assert gang.tick(t) == [] and gang.phase is g.Phase.BACKOFF and "1 of 2" in gang.reason
    gang.update_candidates([A, B])
    t = gang.wake
    assert gang.tick(t) == [g.Reserve(A), g.Reserve(B)]
    gang.refused(B, "price", t + 1)
    assert gang.phase is g.Phase.BACKOFF  # A and C are still possible
    gang.update_candidates([A])
    t = gang.wake
    assert gang.tick(t) == [] and gang.phase is g.Phase.BACKOFF
    gang.update_candidates([A, C])
    t = gang.wake
    assert gang.tick(t) == [g.Reserve(A), g.Reserve(C)]
    assert gang.refused(C, "admission", t + 1) == [g.Release(A)]
    assert gang.phase is g.Phase.FAILED and "only 1 of 2" in gang.reason


def test_a_hold_that_runs_out_before_the_others_answer_releases_all_and_retries():
    gang = g.Gang(2, [A, B], deadline=60_000, seed=3, timing=g.Timing(commit_margin_ms=500))
    gang.start(0)
    gang.held(A, AID[0], 5_000, 10)
    assert gang.next_deadline() == 4_500
    out = gang.tick(4_500)  # B never answered in time: A's hold is about to lapse on its provider
    assert out == [g.Release(B)] and gang.members[A].state is g.State.EXPIRED
    assert gang.phase is g.Phase.BACKOFF
    # B's answer arrives late: it is released again, never kept.
    assert gang.held(B, AID[1], 9_000, 4_600) == [g.Release(B)]


def test_a_silent_member_ends_the_round_like_a_busy_one():
    gang = g.Gang(2, [A, B, C], deadline=60_000, seed=6, timing=g.Timing(answer_ms=3_000))
    gang.start(0)
    gang.held(A, AID[0], 50_000, 10)
    assert gang.next_deadline() == 3_000
    assert gang.tick(3_000) == [g.Release(A)]  # B never answered: A is not kept waiting
    assert gang.members[B].state is g.State.EXPIRED and gang.refusals == {B: "timeout"}
    assert gang.tick(gang.wake) == [g.Reserve(A), g.Reserve(C)]  # B goes to the back


def test_the_deadline_fails_the_gang_and_releases_what_is_held():
    gang = g.Gang(2, [A, B], deadline=1_000, seed=4)
    gang.start(0)
    gang.held(A, AID[0], 50_000, 10)
    assert gang.tick(1_000) == [g.Release(A, "gave up"), g.Release(B, "gave up")]  # held and in flight
    assert gang.phase is g.Phase.FAILED and gang.tick(2_000) == []


def test_retries_are_idempotent_and_contradictions_refused():
    gang = g.Gang(2, [A, B], deadline=60_000, seed=5)
    gang.start(0)
    gang.held(A, AID[0], 5_000, 10)
    assert gang.held(A, AID[0], 5_000, 11) == []  # the same hold again
    with pytest.raises(g.GangError, match="another agreement"):
        gang.held(A, AID[9], 5_000, 12)
    assert gang.members[A].aid == AID[0]  # unchanged
    assert gang.held(B, AID[1], 5_000, 13) == [g.Commit(A), g.Commit(B)]
    assert gang.held(B, AID[1], 5_000, 14) == []  # a retry after the commit
    with pytest.raises(g.GangError, match="not a member"):
        gang.held(C, AID[2], 5_000, 15)


def test_each_event_is_checked_against_the_role_that_emitted_it():
    m = g.Member(A, 0)
    with pytest.raises(g.GangError, match="member cannot Commit"):
        m.process(g.MEMBER, g.Commit(A))
    m.process(g.COORDINATOR, g.Reserve(A))
    with pytest.raises(g.GangError, match="coordinator cannot Held"):
        m.process(g.COORDINATOR, g.Held(A, AID[0], 1))
    with pytest.raises(g.GangError, match="coordinator cannot Commit in state ASKED"):
        m.process(g.COORDINATOR, g.Commit(A))  # never commit what is not held
    with pytest.raises(g.GangError, match="another member"):
        m.process(g.MEMBER, g.Held(B, AID[0], 1))
    m.process(g.MEMBER, g.Held(A, AID[0], 1))
    m.process(g.COORDINATOR, g.Release(A))
    assert m.process(g.COORDINATOR, g.Release(A)) is False  # releasing twice changes nothing
    with pytest.raises(ValueError):
        g.Gang(g.MAX_GANG + 1, [A], deadline=1)
    with pytest.raises(ValueError):
        g.Gang(2, [A, A], deadline=1)


# ---- two coordinators racing for shared members ----------------------------------------------

class SimMember:
    """A provider as the gang sees it: one slot, held no-wait until a deadline
    (the negotiation's countersign timeout), released on withdraw, booked on commit."""

    def __init__(self, hold_ms: int, run_ms: int):
        self.hold_ms, self.run_ms = hold_ms, run_ms
        self.hold: tuple[str, int] | None = None  # (gang, until)
        self.booked: tuple[str, int] | None = None  # (gang, until)
        self.double_booked = 0
        self.bad_commits = 0

    def _expire(self, now: int) -> None:
        if self.hold and now >= self.hold[1]:
            self.hold = None
        if self.booked and now >= self.booked[1]:
            self.booked = None

    def reserve(self, gang: str, now: int) -> bool:
        self._expire(now)
        if self.hold or self.booked:
            return False
        self.hold = (gang, now + self.hold_ms)
        return True

    def release(self, gang: str, now: int) -> None:
        self._expire(now)
        if self.hold and self.hold[0] == gang:
            self.hold = None

    def commit(self, gang: str, now: int) -> None:
        self._expire(now)
        if self.booked:
            self.double_booked += 1
        if not (self.hold and self.hold[0] == gang):
            self.bad_commits += 1  # the gang thought it held this member: not all-or-nothing
            return
        self.hold, self.booked = None, (gang, now + self.run_ms)


def _race(seed: int, loss: float = 0.0) -> tuple[dict, dict]:
    """Two gangs of 2 over 3 shared one-slot members; every message takes 1-80 ms and,
    with ``loss``, reserves, answers and releases are lost at that rate (a lost
    release leaves the hold to lapse; a lost answer leaves the coordinator to give up)."""
    rng = random.Random(seed)
    hold_ms, run_ms = 5_000, 2_000
    members = {p: SimMember(hold_ms, run_ms) for p in (A, B, C)}
    gangs = {"x": g.Gang(2, [A, B, C], deadline=60_000, seed=rng.random()),
             "y": g.Gang(2, [C, B, A], deadline=60_000, seed=rng.random())}
    queue: list = []
    n = 0

    def at(t: int, fn) -> None:
        nonlocal n
        n += 1
        heapq.heappush(queue, (t, n, fn))

    def delay() -> int:
        return rng.randint(1, 80)

    def lost() -> bool:
        return rng.random() < loss

    def perform(name: str, actions: list, now: int) -> None:
        gang = gangs[name]
        for a in actions:
            m = members[a.peer]
            if isinstance(a, g.Reserve):
                rnd = gang.rounds

                def answer(t2, m=m, peer=a.peer, rnd=rnd, ok=True):
                    if rnd != gang.rounds:  # an earlier round's answer (as the driver does)
                        if ok:
                            at(t2 + delay(), lambda t3, m=m: m.release(name, t3))
                        return
                    # The consumer's deadline runs from the agreement's arrival: later than the provider's.
                    perform(name, gang.held(peer, AID[rnd % 16], t2 + hold_ms, t2) if ok
                            else gang.refused(peer, "capacity", t2), t2)

                def arrive(t, m=m, answer=answer):
                    ok = m.reserve(name, t)
                    if not lost():
                        at(t + delay(), lambda t2: answer(t2, ok=ok))
                if not lost():
                    at(now + delay(), arrive)
            elif isinstance(a, g.Release):
                if not lost():
                    at(now + delay(), lambda t, m=m: m.release(name, t))
            elif isinstance(a, g.Commit):
                at(now + delay(), lambda t, m=m: m.commit(name, t))
        nd = gang.next_deadline()
        if nd is not None:
            at(nd, lambda t: perform(name, gang.tick(t), t))

    start = {"x": 0, "y": rng.randint(0, 50)}
    for name in gangs:
        at(start[name], lambda t, name=name: perform(name, gangs[name].start(t), t))
    while queue:
        t, _, fn = heapq.heappop(queue)
        if t > 120_000:
            break
        fn(t)
    return gangs, members


@pytest.mark.parametrize("loss", [0.0, 0.1])
@pytest.mark.parametrize("seed", range(0, 300, 30))
def test_two_coordinators_racing_for_shared_members_never_deadlock_nor_double_book(seed, loss):
    for s in range(seed, seed + 30):  # 300 seeded interleavings in all, with and without lost messages
        gangs, members = _race(s, loss)
        assert all(m.double_booked == 0 and m.bad_commits == 0 for m in members.values()), s
        # No deadlock: both gangs are placed (one after the other: 3 members, 2 each).
        assert [gg.phase for gg in gangs.values()] == [g.Phase.COMMITTED] * 2, (s, [gg.reason for gg in gangs.values()])
        # And never on the same member at once: the loser waited for the winner's run to end.
        x, y = ({m.peer for m in gg.ranked()} for gg in gangs.values())
        assert len(x) == len(y) == 2


# ---- a member's hold on the real negotiation parties (no sockets) -------------------------------

def _held(clock=None):
    prov = make_provider(clock=clock)
    cons = Consumer(C_ID, timeouts=TO, clock=clock)
    parties = {P_ID.peer_id: prov, C_ID.peer_id: cons}
    log = deliver(cons.place(mk_bid(cores=4.0), [prov.asks["a1"]], hold=True), parties)
    return prov, cons, parties, log


def test_a_member_holds_uncountersigned_until_the_gang_commits():
    prov, cons, parties, log = _held()
    assert [s.envelope.type for s in log] == ["propose", "agreement"]  # no countersign yet
    pl = cons.placements["b1"]
    (m,) = prov.negotiations.values()
    key = f"{C_ID.peer_id}/{m.nid.hex()}"
    assert pl.state == "held" and m.state.value == "AGREED"
    assert prov.pool.free()["cpus"] == 0 and not prov.pool.get(key).committed  # capacity held, not sold
    log = deliver(cons.commit_held("b1"), parties)
    assert [s.envelope.type for s in log] == ["countersign"]
    assert m.state.value == "ACTIVE" and prov.pool.get(key).committed and pl.state == "active"


def test_a_released_member_frees_its_capacity_at_once():
    prov, cons, parties, _ = _held()
    log = deliver(cons.release_held("b1", "gang released"), parties)
    assert [s.envelope.type for s in log] == ["reject"]
    assert len(prov.pool) == 0 and not prov.negotiations and prov.finished[-1].state.value == "REJECTED"
    assert "b1" not in cons.placements
    # Another consumer gets the capacity right away.
    other = Consumer(Identity.generate(), timeouts=TO)
    parties[other.peer_id] = other
    deliver(other.place(mk_bid(cores=4.0), [prov.asks["a1"]], hold=True), parties)
    assert other.placements["b1"].state == "held"


def test_a_hold_lapses_on_the_provider_when_no_commit_comes():
    t = [now_ms()]
    prov, cons, parties, _ = _held(clock=lambda: t[0])
    rival = Consumer(Identity.generate(), timeouts=TO, clock=lambda: t[0])
    parties[rival.peer_id] = rival
    deliver(rival.place(mk_bid(cores=4.0), [prov.asks["a1"]], hold=True), parties)
    assert rival.placements["b1"].state == "failed"  # no-wait: refused at once, not queued
    assert "capacity" in rival.placements["b1"].attempts[0][2]
    t[0] += TO.countersign_ms  # the consumer vanished: nothing more from it
    prov.tick(t[0])
    assert len(prov.pool) == 0 and prov.finished[-1].state.value == "EXPIRED"
    cons.tick(t[0])
    assert cons.placements["b1"].state == "expired"
    with pytest.raises(LookupError):
        cons.commit_held("b1")  # too late: the gang releases the others instead
