"""One process-wide bandwidth cap for task transfers (the contributor's
`bandwidth_bytes_per_s`): a token bucket every send and receive loop of
synord.protocols.transfer draws from, so the cap holds for all transfers together.

    PACER.rate = 1 << 20     # bytes per second; 0 = no cap (the default)
    await PACER.take(len(block))
"""

from __future__ import annotations

import trio

BURST_S = 0.25  # a quarter second of credit may be spent at once


class Pacer:
    def __init__(self, rate: int = 0):
        self.rate = rate
        self._credit = 0.0
        self._at = None
        self.waited_s = 0.0  # total time transfers were held back (for tests and metrics)
        self.bytes_total = 0  # everything that went through (for metrics)

    async def take(self, n: int) -> None:
        self.bytes_total += n
        rate = self.rate
        if rate <= 0:
            self._at = None
            return
        now = trio.current_time()
        if self._at is None:
            self._credit = rate * BURST_S
        else:
            self._credit = min(rate * BURST_S, self._credit + (now - self._at) * rate)
        self._at = now
        self._credit -= n
        if self._credit < 0:
            wait = -self._credit / rate
            self.waited_s += wait
            await trio.sleep(wait)
            self._at = trio.current_time()
            self._credit = 0.0


PACER = Pacer()
