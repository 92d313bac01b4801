"""The sandbox kinds, as they are named on the wire (an ask's ``runtimes``, a
bid's ``runtime``, ``task.start``'s ``kind``) and in config and CLI: the one
list. `runtimes` implements exactly these (its registry is keyed by them)."""

RUNTIME_KINDS: tuple[str, ...] = ("wasm", "container", "microvm")
