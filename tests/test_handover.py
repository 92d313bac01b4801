"""The migration hand-over machine (synord.protocols.handover), fed events: no sockets, no sleeps."""

import pytest

from synord.protocols import handover as ho

MB = 1 << 20


def consumer(checkpointable=True, have=False):
    return ho.Handover(ho.CONSUMER, checkpointable, have)


def test_enough_time_moves_a_fresh_checkpoint_straight_to_the_next_provider():
    h = consumer(have=True)
    assert h.notice(grace_s=10, reason="owner", bandwidth_bps=100 * MB, checkpoint_bytes=10 * MB) == "full"
    h.send(ho.RequestStop(push_to="12D3KooNext"))
    assert h.state is ho.State.STOPPING
    h.receive(ho.FinalCheckpoint(pushed_to="12D3KooNext"))
    assert h.state is ho.State.CHECKPOINTED and h.route == "direct"
    assert h.exited(handed_back=True) == "full" and h.state is ho.State.HANDED_OVER


def test_without_a_push_the_checkpoint_goes_through_the_consumer():
    h = consumer()
    h.notice(10, "", 100 * MB, 1 * MB)
    h.send(ho.RequestStop())
    h.receive(ho.FinalCheckpoint())
    assert h.route == "via-consumer" and h.have_checkpoint


def test_little_time_moves_the_last_checkpoint_or_restarts():
    h = consumer(have=True)
    assert h.notice(1, "", 5 * MB, 10 * MB) == "partial"  # ratio 0.5
    h.send(ho.Cancel())
    assert h.exited(handed_back=False) == "partial"
    h2 = consumer(have=False)
    assert h2.notice(1, "", 5 * MB, 10 * MB) == "restart"
    assert consumer(checkpointable=False).notice(100, "", 100 * MB, 1) == "restart"


def test_a_failed_stop_checkpoint_downgrades_and_cancels():
    h = consumer(have=True)
    h.notice(10, "", 100 * MB, MB)
    h.send(ho.RequestStop())
    assert h.checkpoint_failed() is True
    assert h.mode == "partial" and h.state is ho.State.CANCELLING
    assert h.exited(handed_back=False) == "partial"
    h2 = consumer(have=False)
    h2.notice(10, "", 100 * MB, MB)
    h2.send(ho.RequestStop())
    h2.checkpoint_failed()
    assert h2.mode == "restart"


def test_a_periodic_checkpoint_failure_is_no_hand_over():
    h = consumer()
    assert h.checkpoint_failed() is False and h.state is ho.State.RUNNING


def test_a_plain_exit_is_no_move_but_a_handed_back_one_is():
    assert consumer().exited(handed_back=False) is None
    h = consumer()
    assert h.exited(handed_back=True) == "restart"  # handed back without a notice we heard


@pytest.mark.parametrize("event", [ho.RequestStop(), ho.Cancel(), ho.Decide("full")])
def test_the_consumer_cannot_act_before_a_notice(event):
    with pytest.raises(ho.HandoverError):
        consumer().send(event)


def test_illegal_orders_are_refused():
    h = consumer()
    h.notice(1, "", 1, 10 * MB)  # restart
    with pytest.raises(ho.HandoverError, match="full move only"):
        h.send(ho.RequestStop())
    with pytest.raises(ho.HandoverError):
        h.receive(ho.Notice(5))  # a second notice
    with pytest.raises(ho.HandoverError):
        h.send(ho.Decide("teleport"))
    h.send(ho.Cancel())
    h.exited(False)
    with pytest.raises(ho.HandoverError):
        h.receive(ho.Exited(True))  # nothing after the hand-over


def test_the_provider_role_sends_what_the_consumer_receives():
    p = ho.Handover(ho.PROVIDER, True)
    p.send(ho.Notice(5, "owner"))
    p.receive(ho.Decide("full"))
    p.receive(ho.RequestStop("next"))
    p.send(ho.FinalCheckpoint("next"))
    p.send(ho.Exited(True))
    assert p.history == ["Notice", "Decide", "RequestStop", "FinalCheckpoint", "Exited"]
    with pytest.raises(ho.HandoverError):
        ho.Handover(ho.PROVIDER, True).receive(ho.FinalCheckpoint())  # only the provider sends it


def test_restore_plan():
    ck = {"sha256": "a" * 64, "offsets": {"stdout": 3}, "path": "/ck.tar", "bytes": 9}
    assert ho.restore_plan(None, ck, "p", True) == ho.RestorePlan("initial", None, None, False)
    assert ho.restore_plan("restart", ck, "p", True).restore is None
    direct = ho.restore_plan("full", {**ck, "path": None, "at_provider": "p"}, "p", False)
    assert direct.route == "direct" and direct.restore == {"sha256": "a" * 64, "offsets": {"stdout": 3}}
    assert not direct.push
    via = ho.restore_plan("partial", ck, "q", True)
    assert via.route == "via-consumer" and via.push and via.mode == "partial"
    broken = ho.restore_plan("restart-from-checkpoint", ck, "q", intact=False)
    assert broken == ho.RestorePlan("restart", None, None, False)
    elsewhere = ho.restore_plan("full", {**ck, "path": None, "at_provider": "p"}, "q", False)
    assert elsewhere.mode == "restart"  # pushed to a provider that is not the one we start on


def test_decide_mode_thresholds():
    t = ho.Thresholds(full=0.8, partial=0.3)
    assert ho.decide_mode(8, 1, 10, True, True, t) == ("full", 0.8)
    assert ho.decide_mode(3, 1, 10, True, True, t) == ("partial", 0.3)
    assert ho.decide_mode(3, 1, 10, True, False, t)[0] == "restart"
