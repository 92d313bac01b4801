"""The relay-client decision machine (synord.protocols.relayclient), without sockets."""

import math

import pytest
import trio
import trio.testing

from synord.protocols.mesh import MeshError
from synord.protocols.refusals import REFUSALS
from synord.protocols.relayclient import (RelayClientMachine, circuit_addrs, relay_transfer_refusal,
                                          split_circuit, wait_direct)


def _holding(want: int, relay: str, expires_at: float, now: float = 0.0) -> RelayClientMachine:
    """A machine that was granted a reservation on ``relay`` at ``now``."""
    m = RelayClientMachine(want=want, min_lifetime_s=10.0)
    m.candidate(relay, now)
    m.started(relay)
    m.reserved(relay, expires_at, now)
    return m


def test_reserves_on_two_relays_in_the_order_they_came():
    m = RelayClientMachine(want=2)
    for r in ("R1", "R2", "R3"):
        m.candidate(r, 0.0)
    assert m.due(0.0) == ["R1", "R2"]
    m.started("R1"), m.started("R2")
    assert m.due(0.1) == []  # in flight: not asked twice
    m.reserved("R1", 100.0, 1.0)
    m.reserved("R2", 100.0, 1.0)
    assert m.held(2.0) == ["R1", "R2"]
    assert m.due(2.0) == []


def test_renews_at_half_the_lifetime_before_expiry():
    m = _holding(1, "R1", 100.0)
    assert m.next_wakeup(1.0) == 50.0
    assert m.due(49.9) == []
    assert m.due(50.0) == ["R1"]
    m.started("R1")
    m.reserved("R1", 150.0, 50.5)
    assert m.held(120.0) == ["R1"]  # renewed: still held after the first expiry


def test_a_refusing_relay_backs_off_and_another_takes_its_place():
    m = RelayClientMachine(want=1, backoff_min_s=2.0)
    m.candidate("R1", 0.0)
    m.candidate("R2", 0.0)
    assert m.due(0.0) == ["R1"]
    m.started("R1")
    m.failed("R1", 0.0)
    assert m.due(0.0) == ["R2"]  # R2 instead while R1 backs off
    m.started("R2")
    m.failed("R2", 0.0)
    assert m.due(1.0) == []
    assert m.next_wakeup(1.0) == 2.0
    assert m.due(2.0) == ["R1"]
    m.started("R1")
    m.failed("R1", 2.0)  # second failure: back-off doubles (4 s)
    assert m.due(5.9) == ["R2"]
    m.started("R2")
    m.failed("R2", 5.9)
    assert m.next_wakeup(5.95) == 6.0
    assert m.due(6.0) == ["R1"]


def test_a_reservation_too_short_counts_as_refused():
    m = _holding(1, "R1", 5.0)
    assert m.held(1.0) == []
    assert m.to_json(1.0)[0]["failures"] == 1


def test_a_relay_that_went_away_and_came_back_gets_a_fresh_reservation():
    """A relay restart loses our reservation: we must not trust the old expiry."""
    m = _holding(2, "R1", 3600.0)
    m.lost("R1", 10.0)
    assert m.held(10.0) == []
    assert m.due(10.0) == []  # not connected: nothing to do
    assert m.next_wakeup(10.0) == math.inf
    m.candidate("R1", 12.0)  # reconnected
    assert m.due(12.0) == ["R1"]


def test_renewal_of_one_relay_does_not_stop_a_second_from_being_made():
    m = _holding(2, "R1", 100.0)
    m.candidate("R2", 60.0)
    assert sorted(m.due(60.0)) == ["R1", "R2"]  # R1 due for renewal, R2 to fill the second slot


def test_circuit_addresses():
    addrs = circuit_addrs("Rid", ["/ip4/203.0.113.7/tcp/4001", "/ip4/0.0.0.0/tcp/4001",
                                  "/ip4/1.2.3.4/tcp/1/p2p/Rid", "/ip4/1.2.3.4/tcp/1/p2p/Rid/p2p-circuit/p2p/X"], "Me")
    assert addrs == ["/ip4/203.0.113.7/tcp/4001/p2p/Rid/p2p-circuit/p2p/Me",
                     "/ip4/1.2.3.4/tcp/1/p2p/Rid/p2p-circuit/p2p/Me"]
    assert split_circuit(addrs[0]) == ("Rid", "Me")
    assert split_circuit("/ip4/1.2.3.4/tcp/1/p2p/Rid") is None
    assert split_circuit("/p2p-circuit/p2p/Me") is None


def test_large_transfers_are_refused_through_a_relay_small_ones_are_not():
    assert relay_transfer_refusal("P" * 52, 512 << 10, 1 << 20) is None
    why = relay_transfer_refusal("P" * 52, 20 << 20, 1 << 20)
    assert why == "peer PPPPPPPPPPPPPPPP only reachable through a limited relay; transfer of 20.0 MiB refused"


class _Mesh:
    """Stands in for nothing real: only the one question wait_direct asks."""

    def __init__(self, relayed_until: float):
        self.relayed_until = relayed_until

    def relayed_only(self, peer_id: str) -> bool:
        return trio.current_time() < self.relayed_until


def test_wait_direct_waits_for_the_punch_then_refuses_with_the_reason():
    async def main():
        clock_start = trio.current_time()
        await wait_direct(_Mesh(clock_start + 3.0), "P" * 52, 20 << 20)  # direct after 3 s: fine
        before = REFUSALS.get("transfer", "relay-limited")
        with pytest.raises(MeshError, match="only reachable through a limited relay; transfer of 20.0 MiB"):
            await wait_direct(_Mesh(math.inf), "P" * 52, 20 << 20)
        assert REFUSALS.get("transfer", "relay-limited") == before + 1
        await wait_direct(_Mesh(math.inf), "P" * 52, 1000)  # small: may go through the relay
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
