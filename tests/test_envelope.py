"""Envelope codec and validator: every defect is rejected with its own counted reason."""

import msgpack
import pytest

from synord.protocols import caps  # registers "caps"
from synord.protocols.envelope import (MAX_ENVELOPE_BYTES, Envelope, EnvelopeValidator, Rejected, decode,
                                message_type, seal, signing_input)
from synord.protocols.identity import Identity

NOW = 1_800_000_000_000
message_type("test.note", lambda body: None if isinstance(body, dict) and "x" in body
             else (_ for _ in ()).throw(ValueError("needs x")))


def good_caps_body(seq=1):
    return {"profile": {"host": {"cpus": 2}}, "offer": {"cpu": 1}, "addrs": ["/ip4/127.0.0.1/tcp/1"],
            "seq": seq}


def resign(identity: Identity, raw: dict) -> bytes:
    """Re-sign a tampered wire map, so only the intended defect remains."""
    raw["sig"] = identity.sign(signing_input(raw["v"], raw["t"], raw["s"], raw["ts"], raw["exp"],
                                             raw["n"], raw["b"]))
    return msgpack.packb(raw, use_bin_type=True)


@pytest.fixture
def ident():
    return Identity.generate()


def wire(env: Envelope) -> dict:
    return msgpack.unpackb(env.encode(), raw=False)


def test_roundtrip(ident):
    env = seal(ident, "caps", good_caps_body(), now=NOW)
    got = EnvelopeValidator().check(env.encode(), now=NOW + 5)
    assert isinstance(got, Envelope)
    assert got.body == good_caps_body() and got.sender_id == ident.peer_id and got.type == "caps"


def defects(ident):
    """(name, bytes, expected reason) for each kind of bad input."""
    ok = seal(ident, "caps", good_caps_body(), now=NOW)
    out = []
    raw = wire(ok); raw["sig"] = bytes(64)
    out.append(("zeroed signature", msgpack.packb(raw, use_bin_type=True), "bad_signature"))
    raw = wire(ok); raw["b"] = msgpack.packb(good_caps_body(seq=99))  # body swapped after signing
    out.append(("tampered body", msgpack.packb(raw, use_bin_type=True), "bad_signature"))
    other = Identity.generate()
    raw = wire(ok); raw["s"] = other.peer_id_bytes  # claims another sender
    out.append(("forged sender", msgpack.packb(raw, use_bin_type=True), "bad_signature"))
    raw = wire(ok); raw["v"] = 2
    out.append(("unknown version", resign(ident, raw), "bad_version"))
    raw = wire(ok); raw["t"] = "no.such.type"
    out.append(("unknown type", resign(ident, raw), "unknown_type"))
    raw = wire(ok); raw["b"] = msgpack.packb({"profile": "not a map", "addrs": [], "seq": 1})
    out.append(("bad caps body", resign(ident, raw), "bad_body"))
    raw = wire(ok); raw["b"] = b"\xc1\xc1"
    out.append(("garbage body", resign(ident, raw), "bad_body"))
    raw = wire(ok); raw["ts"], raw["exp"] = NOW - 120_000, NOW - 60_000
    out.append(("expired", resign(ident, raw), "expired"))
    raw = wire(ok); raw["ts"], raw["exp"] = NOW + 3_600_000, NOW + 3_660_000
    out.append(("future timestamp", resign(ident, raw), "future_timestamp"))
    raw = wire(ok); raw["exp"] = NOW + 30 * 24 * 3600 * 1000
    out.append(("ttl too long", resign(ident, raw), "bad_expiry"))
    raw = wire(ok); raw["n"] = b"short"
    out.append(("short nonce", resign(ident, raw), "malformed"))
    raw = wire(ok); del raw["sig"]
    out.append(("missing field", msgpack.packb(raw, use_bin_type=True), "malformed"))
    raw = wire(ok); raw["extra"] = 1
    out.append(("unsigned extra field", msgpack.packb(raw, use_bin_type=True), "malformed"))
    out.append(("not msgpack", b"\xc1" * 40, "malformed"))
    out.append(("not a map", msgpack.packb([1, 2, 3]), "malformed"))
    out.append(("empty", b"", "malformed"))
    out.append(("oversized", b"\x00" * (MAX_ENVELOPE_BYTES + 1), "oversized"))
    return out


def test_every_defect_rejected_and_counted(ident):
    v = EnvelopeValidator()
    expected = {}
    for name, data, reason in defects(ident):
        got = v.check(data, now=NOW)
        assert isinstance(got, Rejected), name
        assert got.reason == reason, f"{name}: {got}"
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(v.rejected) == expected
    assert v.accepted == 0


def test_replay_rejected(ident):
    v = EnvelopeValidator()
    data = seal(ident, "caps", good_caps_body(), now=NOW).encode()
    assert isinstance(v.check(data, now=NOW), Envelope)
    got = v.check(data, now=NOW + 10)
    assert isinstance(got, Rejected) and got.reason == "replay"
    assert v.rejected["replay"] == 1


def test_rate_limited_per_peer(ident):
    v = EnvelopeValidator(rate_per_peer=1.0, burst_per_peer=3.0)
    peer = ident.peer_id_bytes
    results = [v.check(seal(ident, "caps", good_caps_body(i), now=NOW).encode(), now=NOW, peer=peer)
               for i in range(5)]
    assert [isinstance(r, Envelope) for r in results] == [True, True, True, False, False]
    assert v.rejected["rate_limited"] == 2
    # another peer has its own bucket; time refills the first one
    assert isinstance(v.check(seal(ident, "caps", good_caps_body(9), now=NOW).encode(), now=NOW,
                              peer=Identity.generate().peer_id_bytes), Envelope)
    assert isinstance(v.check(seal(ident, "caps", good_caps_body(10), now=NOW).encode(),
                              now=NOW + 2000, peer=peer), Envelope)


def test_caps_body_bounds(ident):
    with pytest.raises(ValueError, match="exceeds"):
        caps.make_caps(ident, {"blob": "x" * (caps.MAX_BODY_BYTES + 1)}, {}, [], 1)
    with pytest.raises(ValueError, match="addrs"):
        caps.check_body({"profile": {}, "addrs": ["/ip4/1.2.3.4/tcp/1"] * (caps.MAX_ADDRS + 1),
                         "seq": 1})
    with pytest.raises(ValueError, match="seq"):
        caps.check_body({"profile": {}, "addrs": [], "seq": -1})
    with pytest.raises(ValueError, match="unknown fields"):
        caps.check_body({"profile": {}, "addrs": [], "seq": 1, "evil": 1})
    env = caps.make_caps(ident, {"host": {}}, {"cpu": 2}, ["/ip4/127.0.0.1/tcp/5"], 7)
    assert decode(env.encode()).body["seq"] == 7


def test_seq_counter_increases():
    c = caps.SeqCounter()
    a, b = c.next(), c.next()
    assert b > a > 1_600_000_000_000


def test_origin_buckets_are_bounded_and_newcomers_share_one_budget(ident):
    """20 000 fresh origins neither grow the bucket table past its bound nor get
    20 000 fresh bursts: together they get the shared newcomer budget."""
    v = EnvelopeValidator(max_origins=100, new_origin_rate=10.0, new_origin_burst=20.0)
    data = b"\x80"  # garbage is fine: the rate check comes first
    accepted_tokens = 0
    for i in range(20_000):
        r = v.check(data, now=NOW, peer=i.to_bytes(8, "big"))
        if r.reason != "rate_limited_new_origin":
            accepted_tokens += 1
    assert accepted_tokens == 20  # the shared burst, not one burst per origin
    assert v.tracked_origins() <= 100
    assert v.rejected["rate_limited_new_origin"] == 20_000 - 20
    # the shared budget refills with time (10/s): one second later, ten more newcomers
    later = [v.check(data, now=NOW + 1000, peer=(10**6 + i).to_bytes(8, "big")) for i in range(15)]
    assert sum(r.reason != "rate_limited_new_origin" for r in later) == 10


def test_forgotten_origin_gets_no_fresh_burst(ident):
    v = EnvelopeValidator(rate_per_peer=1.0, burst_per_peer=400.0, max_origins=2,
                          new_origin_tokens=2.0)
    peer = ident.peer_id_bytes
    results = [v.check(seal(ident, "caps", good_caps_body(i), now=NOW).encode(), now=NOW, peer=peer)
               for i in range(4)]
    assert [isinstance(r, Envelope) for r in results] == [True, True, False, False]
    for other in (b"a", b"b"):  # push our origin out of the table
        v.check(b"\x80", now=NOW, peer=other)
    again = v.check(seal(ident, "caps", good_caps_body(7), now=NOW).encode(), now=NOW, peer=peer)
    assert isinstance(again, Envelope)  # back as a newcomer: two tokens, not 400
    assert isinstance(v.check(seal(ident, "caps", good_caps_body(8), now=NOW).encode(), now=NOW, peer=peer), Envelope)
    assert v.check(seal(ident, "caps", good_caps_body(9), now=NOW).encode(), now=NOW, peer=peer).reason == "rate_limited"
