"""The stream budget and deadlines, fed directly (no sockets): caps per peer and in
total, bytes charged and released, refusals counted under where="streams"."""

import pytest
import trio

from synord.protocols.framing import FramedStream, StreamLimitError
from synord.protocols.refusals import REFUSALS
from synord.protocols.streamlimits import Refusal, StreamBudget, StreamGuard, StreamLimits


def test_stream_caps_per_peer_and_total_and_slots_given_back():
    b = StreamBudget(StreamLimits(max_streams_per_peer=2, max_streams_total=3))
    before = REFUSALS.snapshot()
    assert [b.open_stream("a") for _ in range(3)] == [None, None, Refusal.TOO_MANY_PEER]
    assert b.open_stream("b") is None
    assert b.open_stream("c") == Refusal.TOO_MANY_TOTAL
    b.close_stream("a")
    assert b.open_stream("c") is None and b.streams_total == 3
    after = REFUSALS.snapshot()
    assert after[("streams", Refusal.TOO_MANY_PEER)] - before.get(("streams", Refusal.TOO_MANY_PEER), 0) == 1
    assert after[("streams", Refusal.TOO_MANY_TOTAL)] - before.get(("streams", Refusal.TOO_MANY_TOTAL), 0) == 1


def test_buffered_bytes_per_peer_and_total():
    b = StreamBudget(StreamLimits(max_buffered_per_peer=100, max_buffered_total=150))
    ga = StreamGuard(b, "a", b.limits, inbound=True)
    gb = StreamGuard(b, "b", b.limits, inbound=True)
    assert ga.reserve(100) is None and ga.reserve(1) == Refusal.BUFFER_PEER
    assert gb.reserve(60) == Refusal.BUFFER_TOTAL and gb.reserve(50) is None
    ga.release()
    assert b.buffered_total == 50 and b.buffered_of("a") == 0


def test_limits_refuse_nonsense():
    with pytest.raises(ValueError):
        StreamLimits(frame_s=0)
    with pytest.raises(ValueError):
        StreamLimits(max_buffered_total=0)


class Trickle:
    """A peer that sent ``data`` and then nothing more."""

    def __init__(self, data: bytes):
        self.data, self.was_reset = data, False

    async def read(self, n):
        if self.data:
            out, self.data = self.data[:n], self.data[n:]
            return out
        await trio.sleep_forever()

    async def write(self, data):
        pass

    async def close(self):
        pass

    async def reset(self):
        self.was_reset = True


@pytest.mark.parametrize("sent, reason", [
    (b"", Refusal.FIRST_FRAME),                                   # silent from the start
    (b"\x00\x40\x00\x00" + b"x" * 1000, Refusal.FRAME_BODY),       # 4 MiB declared, 1000 B sent
    (b"\x00\x00\x00\x01\xc0", Refusal.IDLE),                       # one frame (nil), then silence
])
async def test_deadlines_reset_and_release(autojump_clock, sent, reason):
    b = StreamBudget(StreamLimits(first_frame_s=5, idle_s=7, frame_s=3))
    raw = Trickle(sent)
    s = FramedStream(raw, guard=StreamGuard(b, "p", b.limits, inbound=True))
    before = REFUSALS.get("streams", reason)
    with pytest.raises(StreamLimitError) as err:
        while True:
            await s.receive()
    assert err.value.reason == reason and raw.was_reset
    assert REFUSALS.get("streams", reason) == before + 1
    assert b.buffered_total == 0  # the 1000 bytes held are given back


async def test_quiet_protocol_has_no_idle_deadline(autojump_clock):
    b = StreamBudget(StreamLimits(idle_s=7))
    s = FramedStream(Trickle(b"\x00\x00\x00\x01\xc0"), guard=StreamGuard(b, "p", b.limits, inbound=True,
                                                                          idle=False))
    assert await s.receive() is None
    with trio.move_on_after(3600) as waited:
        await s.receive()
    assert waited.cancelled_caught  # still waiting after an hour: no idle deadline

