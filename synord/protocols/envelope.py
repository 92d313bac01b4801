"""The one envelope codec for everything that crosses the wire.

Wire form (msgpack map, short keys; see docs/WIRE.md):

    {"v": 1, "t": type, "s": sender peer id (binary), "ts": unix ms,
     "exp": unix ms, "n": 16-byte nonce, "b": msgpack body (bytes), "sig": 64 bytes}

The body travels as bytes, so the signing input is deterministic without a
canonical map encoding:

    SIGNING_DOMAIN || msgpack([v, t, s, ts, exp, n, b])

Verification needs nothing but the envelope: the sender's Ed25519 key is
inside its peer id.  `EnvelopeValidator` applies every rule (size, version,
type, signature, clock, replay, per-peer rate) and counts rejections by reason;
it never raises on hostile input, it returns a `Rejected`.
"""

from __future__ import annotations

import os
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack

from .identity import Identity, b58encode, verify

VERSION = 1
SIGNING_DOMAIN = b"synord/envelope/1\x00"
MAX_ENVELOPE_BYTES = 256 * 1024
MAX_CLOCK_SKEW_MS = 30_000
MAX_TTL_MS = 24 * 3600 * 1000
DEFAULT_TTL_MS = 60_000

# Type name -> body checker (raises ValueError with a reason). Modules that
# define messages register them at import time via `message_type`.
_REGISTRY: dict[str, Callable[[Any], None]] = {}


def message_type(name: str, check: Callable[[Any], None] | None = None) -> None:
    """Register a message type and the function that checks its body (what it
    returns is kept as the decoded envelope's ``parsed``)."""
    _REGISTRY[name] = check or (lambda body: None)


def registered_types() -> list[str]:
    return sorted(_REGISTRY)


def body_checker(name: str) -> Callable[[Any], Any]:
    """The function that checks bodies of type ``name`` (raises ValueError on a bad one)."""
    return _REGISTRY[name]


class EnvelopeError(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Envelope:
    version: int
    type: str
    sender: bytes  # binary peer id
    timestamp_ms: int
    expiry_ms: int
    nonce: bytes
    body_bytes: bytes
    signature: bytes
    body: Any = field(default=None, compare=False)
    # what the type's checker returned (e.g. the typed order): `decode` parsed
    # the body once to check it, its users need not parse it again
    parsed: Any = field(default=None, compare=False, repr=False)

    @property
    def sender_id(self) -> str:
        return b58encode(self.sender)

    def signing_input(self) -> bytes:
        return signing_input(self.version, self.type, self.sender, self.timestamp_ms,
                             self.expiry_ms, self.nonce, self.body_bytes)

    def encode(self) -> bytes:
        return msgpack.packb({
            "v": self.version, "t": self.type, "s": self.sender,
            "ts": self.timestamp_ms, "exp": self.expiry_ms, "n": self.nonce,
            "b": self.body_bytes, "sig": self.signature,
        }, use_bin_type=True)


def signing_input(v: int, t: str, s: bytes, ts: int, exp: int, n: bytes, b: bytes) -> bytes:
    return SIGNING_DOMAIN + msgpack.packb([v, t, s, ts, exp, n, b], use_bin_type=True)


def now_ms() -> int:
    return int(time.time() * 1000)


def pack_body(body: Any) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def unpack_body(data: bytes, max_bytes: int = MAX_ENVELOPE_BYTES) -> Any:
    return msgpack.unpackb(
        data, raw=False, strict_map_key=True,
        max_bin_len=max_bytes, max_str_len=max_bytes,
        max_array_len=65536, max_map_len=65536, max_ext_len=0,
    )


def seal(identity: Identity, type_: str, body: Any, ttl_ms: int = DEFAULT_TTL_MS,
         now: int | None = None) -> Envelope:
    """Sign ``body`` as a message of ``type_`` from ``identity``."""
    ts = now_ms() if now is None else now
    body_bytes = pack_body(body)
    nonce = os.urandom(16)
    sender = identity.peer_id_bytes
    sig = identity.sign(signing_input(VERSION, type_, sender, ts, ts + ttl_ms, nonce, body_bytes))
    return Envelope(VERSION, type_, sender, ts, ts + ttl_ms, nonce, body_bytes, sig, body)


def decode(data: bytes, max_bytes: int = MAX_ENVELOPE_BYTES) -> Envelope:
    """Parse and check structure + signature (not time, replay or rate)."""
    if len(data) > max_bytes:
        raise EnvelopeError("oversized", f"{len(data)} > {max_bytes} bytes")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=max_bytes,
                              max_str_len=4096, max_array_len=16, max_map_len=16, max_ext_len=0)
    except Exception as exc:  # msgpack raises many types on garbage
        raise EnvelopeError("malformed", type(exc).__name__) from None
    if not isinstance(raw, dict):
        raise EnvelopeError("malformed", "not a map")
    v = raw.get("v")
    if v != VERSION:
        raise EnvelopeError("bad_version", repr(v))
    try:
        t, s, ts, exp, n, b, sig = (raw[k] for k in ("t", "s", "ts", "exp", "n", "b", "sig"))
    except KeyError as exc:
        raise EnvelopeError("malformed", f"missing {exc.args[0]}") from None
    if len(raw) != 8:  # one encoding per envelope: no room for unsigned extra fields
        raise EnvelopeError("malformed", "unexpected fields")
    if not (isinstance(t, str) and isinstance(s, bytes) and isinstance(ts, int)
            and isinstance(exp, int) and isinstance(n, bytes) and isinstance(b, bytes)
            and isinstance(sig, bytes)):
        raise EnvelopeError("malformed", "field of wrong type")
    if len(n) != 16 or len(sig) != 64:
        raise EnvelopeError("malformed", "nonce or signature length")
    if t not in _REGISTRY:
        raise EnvelopeError("unknown_type", t)
    if not verify(s, signing_input(v, t, s, ts, exp, n, b), sig):
        raise EnvelopeError("bad_signature", b58encode(s)[:16])
    try:
        body = unpack_body(b, max_bytes)
        parsed = _REGISTRY[t](body)
    except EnvelopeError:
        raise
    except Exception as exc:
        raise EnvelopeError("bad_body", f"{t}: {exc}") from None
    return Envelope(v, t, s, ts, exp, n, b, sig, body, parsed)


@dataclass
class Rejected:
    reason: str
    detail: str = ""


class EnvelopeValidator:
    """Every acceptance rule in one place; counts rejections by reason.

    ``check(data, now)`` returns an Envelope or a Rejected. Replays are caught
    by remembering (sender, nonce) until the envelope expires; the memory is
    bounded (oldest entries are dropped, and an envelope older than the
    window is refused as expired anyway).
    """

    def __init__(self, max_bytes: int = MAX_ENVELOPE_BYTES, max_skew_ms: int = MAX_CLOCK_SKEW_MS,
                 max_ttl_ms: int = MAX_TTL_MS, replay_capacity: int = 200_000,
                 rate_per_peer: float = 200.0, burst_per_peer: float = 400.0,
                 max_origins: int = 10_000, new_origin_rate: float = 50.0,
                 new_origin_burst: float = 100.0, new_origin_tokens: float = 20.0):
        self.max_bytes = max_bytes
        self.max_skew_ms = max_skew_ms
        self.max_ttl_ms = max_ttl_ms
        self.replay_capacity = replay_capacity
        self.rate_per_peer = rate_per_peer
        self.burst_per_peer = burst_per_peer
        # Per-origin buckets, least recently used first, at most ``max_origins``.
        # An origin without a bucket (new, or forgotten) first takes a token
        # from one bucket shared by all newcomers and starts with only
        # ``new_origin_tokens``: churning through fresh keys buys no more than
        # ``new_origin_rate`` messages per second in total, and forgetting an
        # origin never hands it a fresh full burst.
        self.max_origins = max_origins
        self.new_origin_rate = new_origin_rate
        self.new_origin_burst = new_origin_burst
        self.new_origin_tokens = min(new_origin_tokens, burst_per_peer)
        self._newcomers: tuple[float, int | None] = (new_origin_burst, None)
        self._seen: OrderedDict[bytes, int] = OrderedDict()
        self._buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()
        self.rejected: Counter[str] = Counter()
        self.accepted = 0

    def check(self, data: bytes, now: int | None = None, peer: bytes | None = None) -> Envelope | Rejected:
        now = now_ms() if now is None else now
        if peer is not None:
            limited = self._take_token(peer, now)
            if limited is not None:
                return self._reject(limited, b58encode(peer)[:16])
        try:
            env = decode(data, self.max_bytes)
        except EnvelopeError as exc:
            return self._reject(exc.reason, str(exc))
        if env.timestamp_ms > now + self.max_skew_ms:
            return self._reject("future_timestamp", str(env.timestamp_ms - now))
        if env.expiry_ms <= now:
            return self._reject("expired", str(now - env.expiry_ms))
        if env.expiry_ms - env.timestamp_ms > self.max_ttl_ms or env.expiry_ms < env.timestamp_ms:
            return self._reject("bad_expiry", str(env.expiry_ms - env.timestamp_ms))
        key = env.sender + env.nonce
        if key in self._seen:
            return self._reject("replay", env.sender_id[:16])
        self._remember(key, env.expiry_ms, now)
        self.accepted += 1
        return env

    def _remember(self, key: bytes, expiry: int, now: int) -> None:
        self._seen[key] = expiry
        while self._seen:
            oldest_key, oldest_exp = next(iter(self._seen.items()))
            if oldest_exp <= now or len(self._seen) > self.replay_capacity:
                del self._seen[oldest_key]
            else:
                break

    def _take_token(self, peer: bytes, now: int) -> str | None:
        """None if ``peer`` may send one more message now, else the rejection reason."""
        entry = self._buckets.get(peer)
        if entry is None:
            shared, last = self._newcomers
            if last is not None:
                shared = min(self.new_origin_burst,
                             shared + max(0, now - last) / 1000.0 * self.new_origin_rate)
            if shared < 1.0:
                self._newcomers = (shared, now)
                return "rate_limited_new_origin"
            self._newcomers = (shared - 1.0, now)
            tokens, last = self.new_origin_tokens, now
        else:
            tokens, last = entry
            self._buckets.move_to_end(peer)
        tokens = min(self.burst_per_peer, tokens + max(0, now - last) / 1000.0 * self.rate_per_peer)
        if tokens < 1.0:
            self._buckets[peer] = (tokens, now)
            return "rate_limited"
        self._buckets[peer] = (tokens - 1.0, now)
        while len(self._buckets) > self.max_origins:
            self._buckets.popitem(last=False)
        return None

    def tracked_origins(self) -> int:
        return len(self._buckets)

    def _reject(self, reason: str, detail: str) -> Rejected:
        self.rejected[reason] += 1
        return Rejected(reason, detail)


class PeerEnvelopeRefused(Exception):
    """A stream's opening envelope refused: ``slug`` is the counted reason (ours,
    stable: bad_request, envelope_<validator reason>, unexpected_message,
    wrong_signer), the message says why in our words."""

    def __init__(self, slug: str, message: str):
        super().__init__(message)
        self.slug = slug


def peer_envelope(validator: EnvelopeValidator, data: Any, remote_peer: str, types: tuple[str, ...]) -> Envelope:
    """The one check of an envelope a peer opens a stream with: well-formed and
    accepted (signature, expiry, replay), one of ``types``, and signed by the
    peer the stream is authenticated to (so nobody speaks in another's name)."""
    if not isinstance(data, bytes):
        raise PeerEnvelopeRefused("bad_request", f"expected a signed {' or '.join(types)}")
    env = validator.check(data)
    if isinstance(env, Rejected):
        # env.reason is one of the validator's own slugs, never peer text
        raise PeerEnvelopeRefused(f"envelope_{env.reason}", f"envelope rejected: {env.reason} ({env.detail})")
    if env.type not in types:
        raise PeerEnvelopeRefused("unexpected_message", f"unexpected message {env.type}")
    if env.sender_id != remote_peer:
        raise PeerEnvelopeRefused("wrong_signer", "envelope not signed by the connected peer")
    return env
