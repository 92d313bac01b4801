"""The bandwidth cap (contributor `bandwidth_bytes_per_s`) as a token bucket,
on trio's virtual clock: no sockets, no real waiting."""

import trio
import trio.testing

from synord.protocols.pacing import BURST_S, Pacer


def run(fn):
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_capped_transfer_takes_size_over_rate_less_the_burst():
    async def main():
        pacer = Pacer(rate=256 << 10)
        t0 = trio.current_time()
        for _ in range(64):  # 1 MiB in 16 KiB blocks
            await pacer.take(16 << 10)
        elapsed = trio.current_time() - t0
        assert abs(elapsed - (4.0 - BURST_S)) < 0.01
        assert abs(pacer.waited_s - elapsed) < 0.01
    run(main)


def test_no_cap_never_waits_and_a_cap_can_be_lifted_live():
    async def main():
        pacer = Pacer()
        for _ in range(100):
            await pacer.take(1 << 20)
        assert trio.current_time() == 0 and pacer.waited_s == 0
        pacer.rate = 1 << 20
        await pacer.take(2 << 20)
        assert pacer.waited_s > 1.5
        pacer.rate = 0
        t = trio.current_time()
        await pacer.take(100 << 20)
        assert trio.current_time() == t
    run(main)
