"""A consumer that sends negotiation messages faster than the per-peer rate is
slowed down, not dropped: on two real market services (py-libp2p hosts on
loopback) a burst of proposals beyond the rate's burst all reach agreement,
and every abandoned agreement is released by its end message, not by the
lease timing out (a dropped end used to hold the capacity for the lease)."""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from synord.protocols.negotiation import State

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from bench_placement import NEEDS, two_markets  # noqa: E402  (the bench's two-service set-up)

ROUNDS = 10  # 8 proposals at once per round: 240 messages, far beyond the 20 a new peer may send unpaced


def test_a_burst_of_negotiations_is_paced_not_dropped(tmp_path):
    async def main():
        async with two_markets(tmp_path) as (_, _, prov, cons, cand):
            agreed = []

            async def one():
                agreed.append(await cons.negotiate(cand, NEEDS))
            with trio.fail_after(60):
                for _ in range(ROUNDS):  # the provider offers 8 cores: 8 agreements at a time
                    async with trio.open_nursery() as burst:
                        for _ in range(8):
                            burst.start_soon(one)
                    for terms in agreed[-8:]:
                        await cons.abandon(terms, "test round over")
                while prov.pool.used()["cpus"] > 0 or prov.provider.negotiations:
                    await trio.sleep(0.01)
            ended = [m for m in prov.provider.finished if m.csig is not None]
            assert len(ended) == len(agreed) == 8 * ROUNDS
            # released by the consumer's end message, not by a lease running out
            assert all(m.state is State.ENDED and m.reason == "test round over" for m in ended)
            assert prov.validator.rejected["rate_limited"] == 0
    trio.run(main)
