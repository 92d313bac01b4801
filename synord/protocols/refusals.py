"""One tally of everything this process refused from a peer (or from a local
caller), by where and why, exported by /metrics as
``synord_refusals_total{where,reason}``.

Process-wide on purpose, like Prometheus' default registry: a daemon is one
process, and any layer (a stream handler, the book, the job path, the API) can
count a refusal without threading a counter object through every constructor.
``where`` names the component (``task``, ``transfer``, ``negotiate``, ``book``,
``streams``, ``api``, ...), ``reason`` a short stable slug; neither may come
from the peer (bounded label cardinality).
"""

from __future__ import annotations

import threading
from collections import Counter


class Refusals:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # wasmtime/NVML threads may count too
        self._counts: Counter[tuple[str, str]] = Counter()

    def count(self, where: str, reason: str, n: int = 1) -> None:
        with self._lock:
            self._counts[(where, reason)] += n

    def get(self, where: str, reason: str) -> int:
        with self._lock:
            return self._counts[(where, reason)]

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)


REFUSALS = Refusals()
