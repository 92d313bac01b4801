"""The ``caps`` message: a node's signed capability announcement.

Body (msgpack map, see docs/WIRE.md "caps"):

    {"profile": map   -- the hwprobe CapabilityProfile JSON (devices, host, runtimes ...)
     "offer":   map   -- offerable capacity after contributor limits (may be empty)
     "addrs":   [str] -- the sender's listen multiaddrs, each ending in /p2p/<sender>
     "seq":     int}  -- strictly increasing per sender (unix ms based, survives restarts)

A receiver keeps only the announcement with the highest ``seq`` per sender.
"""

from __future__ import annotations

import time
from typing import Any

from .envelope import Envelope, message_type, pack_body, seal
from .identity import Identity

TYPE = "caps"
MAX_BODY_BYTES = 64 * 1024
MAX_ADDRS = 16
MAX_ADDR_LEN = 256
TTL_MS = 5 * 60 * 1000


def check_body(body: Any) -> None:
    if not isinstance(body, dict):
        raise ValueError("body is not a map")
    extra = set(body) - {"profile", "offer", "addrs", "seq"}
    if extra:
        raise ValueError(f"unknown fields {sorted(extra)}")
    if not isinstance(body.get("profile"), dict):
        raise ValueError("profile must be a map")
    if not isinstance(body.get("offer", {}), dict):
        raise ValueError("offer must be a map")
    addrs = body.get("addrs")
    if not isinstance(addrs, list) or len(addrs) > MAX_ADDRS:
        raise ValueError(f"addrs must be a list of at most {MAX_ADDRS}")
    for a in addrs:
        if not isinstance(a, str) or not a.startswith("/") or len(a) > MAX_ADDR_LEN:
            raise ValueError("addrs entries must be multiaddr strings")
    seq = body.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2**63:
        raise ValueError("seq must be a non-negative integer")
    size = len(pack_body(body))
    if size > MAX_BODY_BYTES:
        raise ValueError(f"body of {size} bytes exceeds {MAX_BODY_BYTES}")


message_type(TYPE, check_body)


class SeqCounter:
    """Strictly increasing, starting from the clock so a restart still goes up."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        self._last = max(self._last + 1, int(time.time() * 1000))
        return self._last


def make_caps(identity: Identity, profile: dict, offer: dict | None, addrs: list[str],
              seq: int, ttl_ms: int = TTL_MS) -> Envelope:
    body = {"profile": profile, "offer": offer or {}, "addrs": list(addrs)[:MAX_ADDRS], "seq": seq}
    check_body(body)  # refuse to send what every peer would reject
    return seal(identity, TYPE, body, ttl_ms=ttl_ms)
