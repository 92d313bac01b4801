"""Fuzzing every decoder a peer's bytes reach: the envelope codec, the framing
reader, each registered message body checker, and the stream protocols'
decoders (negotiation parties, transfer receiver, peer exchange, caps sync).

Arbitrary input and structure-aware mutations of valid messages must end in
the documented refusal -- `EnvelopeError` / `Rejected` for envelopes,
`FrameError` / `EOFError` / `RemoteError` for frames, ValueError subclasses for
bodies, `TransferError` for transfers, a dropped message for the negotiation
parties -- and never in anything else.  Bounded: few examples, no deadline.
"""

from __future__ import annotations

import functools
import math
import os

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings, strategies as st

import synord.protocols.caps  # noqa: F401  (registers its message type)
import synord.protocols.forward  # noqa: F401
import synord.protocols.shell  # noqa: F401
import synord.protocols.tasks  # noqa: F401
from synord.protocols.envelope import (Envelope, EnvelopeError, EnvelopeValidator, Rejected, body_checker, decode,
                                registered_types, seal)
from synord.protocols.framing import FrameError, FramedStream, RemoteError, StreamLimitError
from synord.protocols.identity import Identity
from synord.protocols.mesh import parse_px_reply
from synord.protocols.orders import Cancel
from synord.protocols.negotiation import Countersign, End, Heartbeat, Reject
from synord.protocols.receipts import ReceiptAck
from synord.protocols.shell import exec_body, terminal_size
from synord.protocols.streamlimits import StreamBudget, StreamGuard, StreamLimits
from synord.protocols.transfer import BlobStore, TransferError, receive_file
from synord.mesh_service import parse_sync_reply

from test_market_book import ask as mk_ask, bid as mk_bid
from test_negotiation import C_ID, NID, P_ID, TO, agreement, make_provider, proposal
from test_receipts import signed as signed_receipt
from synord.market.negotiator import Consumer

# CI: 40 fixed examples per test (and per message type); SYNORD_FUZZ_EXAMPLES=5000 explores (randomly) for longer
_DEEP = int(os.environ.get("SYNORD_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_DEEP or 40, deadline=None, suppress_health_check=list(HealthCheck),
                derandomize=not _DEEP, database=None)
SIGNER = Identity.generate()
SHA = "ab" * 32

# -- structures a msgpack body can hold ----------------------------------------
leaves = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40) | st.binary(max_size=80))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=5)
                      | st.dictionaries(st.text(max_size=12), inner, max_size=5), max_leaves=25)


@functools.cache
def valid_bodies() -> dict[str, object]:
    """One valid body per registered message type (shared: mutations copy, never edit)."""
    ag = agreement()
    return {
        "caps": {"profile": {"host": {"cpus": 2}}, "offer": {"cpu": 1},
                 "addrs": ["/ip4/127.0.0.1/tcp/4001/p2p/" + SIGNER.peer_id], "seq": 7},
        "ask": mk_ask().to_body(), "bid": mk_bid().to_body(),
        "cancel": Cancel("a1", "cpu", "ask", 3).to_body(),
        "propose": proposal().to_body(), "agreement": ag.to_body(),
        "countersign": Countersign(NID, ag.terms.aid, ag.terms.sign(C_ID)).to_body(),
        "heartbeat": Heartbeat(NID, 3).to_body(), "end": End(NID, "completed", "done").to_body(),
        "reject": Reject(NID, "capacity").to_body(),
        "receipt": signed_receipt().to_body(),
        "receipt_ack": ReceiptAck(b"a" * 16, b"s" * 64).to_body(),
        "task.start": {"job_id": "job-1", "agreement_id": "ab" * 16, "kind": "wasm", "artifact_sha256": SHA,
                       "args": ["x"], "env": {"K": "V"}, "limits": {"cpus": 1.0, "memory_bytes": 64 << 20},
                       "checkpointable": True, "checkpoint_interval_s": 5,
                       "restore": {"sha256": SHA, "offsets": {"stdout": 1, "stderr": 0}}},
        "task.attach": {"job_id": "job-1", "offsets": {"stdout": 10, "stderr": 0}},
        "shell.exec": exec_body("job-1", ["sh", "-c", "true"], {"A": "b"}, (24, 80)),
        "forward.open": {"job_id": "job-1", "port": 8080},
        "blob.offer": {"sha256": SHA, "size": 3, "kind": "artifact", "job_id": "job-1"},
        "blob.grant": {"job_id": "job-1", "from": "p1", "to": "p2"},
    }


def test_every_registered_type_has_a_valid_sample():
    bodies = valid_bodies()
    wire_types = {t for t in registered_types() if not t.startswith("test.")}  # tests register their own
    assert set(bodies) == wire_types, "add a sample for each new message type"
    for name, body in bodies.items():
        body_checker(name)(body)  # raises if the sample is not valid


def mutate(data, value, depth: int = 0):
    """A structure-aware mutation: replace, drop or add one field somewhere, or retype a value."""
    op = data.draw(st.sampled_from(["replace", "descend", "descend", "drop", "add", "retype"]))
    if op == "descend" and isinstance(value, dict) and value and depth < 4:
        key = data.draw(st.sampled_from(sorted(value, key=repr)))
        return {**value, key: mutate(data, value[key], depth + 1)}
    if op == "descend" and isinstance(value, list) and value and depth < 4:
        i = data.draw(st.integers(0, len(value) - 1))
        return value[:i] + [mutate(data, value[i], depth + 1)] + value[i + 1:]
    if op == "drop" and isinstance(value, dict) and value:
        key = data.draw(st.sampled_from(sorted(value, key=repr)))
        return {k: v for k, v in value.items() if k != key}
    if op == "add" and isinstance(value, dict):
        return {**value, data.draw(st.text(max_size=8)): data.draw(values)}
    if op == "retype":
        return data.draw(st.sampled_from([None, True, -1, 0, 2**64 - 1, -2**63, math.nan, math.inf, -0.0,
                                          "", "x" * 5000, b"", b"\x00" * 5000, [], {}, [value], {"": value}]))
    return data.draw(values)


# -- message bodies ----------------------------------------------------------------

TYPES = sorted(valid_bodies())


@pytest.mark.parametrize("name", TYPES)
@FUZZ
@given(body=values)
def test_body_checkers_refuse_arbitrary_structures_with_valueerror(name, body):
    try:
        body_checker(name)(body)
    except ValueError:
        pass


@pytest.mark.parametrize("name", TYPES)
@FUZZ
@given(data=st.data())
def test_body_checkers_refuse_mutated_valid_bodies_with_valueerror(name, data):
    body = mutate(data, valid_bodies()[name])
    try:
        body_checker(name)(body)
    except ValueError:
        pass


@FUZZ
@given(size=st.one_of(st.tuples(st.integers(), st.integers()), values))
def test_terminal_size_refuses_with_valueerror(size):
    try:
        terminal_size(size)
    except ValueError:
        pass


# -- the envelope codec --------------------------------------------------------------

@FUZZ
@given(data=st.binary(max_size=600))
def test_envelope_decode_arbitrary_bytes(data):
    try:
        decode(data)
    except EnvelopeError:
        pass
    assert isinstance(EnvelopeValidator().check(data, peer=SIGNER.peer_id_bytes), (Envelope, Rejected))


@pytest.mark.parametrize("name", TYPES)
@FUZZ
@given(data=st.data())
def test_envelope_mutations_of_valid_envelopes(name, data):
    raw = msgpack.unpackb(seal(SIGNER, name, valid_bodies()[name]).encode(), raw=False)
    how = data.draw(st.sampled_from(["field", "bytes", "signed_body"]))
    if how == "field":  # one wire field changed (signature no longer matches, or a bad type)
        try:
            encoded = msgpack.packb(mutate(data, raw), use_bin_type=True)
        except (OverflowError, ValueError, TypeError):
            return  # not encodable: never on the wire
    elif how == "bytes":  # the encoding itself damaged
        encoded = bytearray(seal(SIGNER, name, valid_bodies()[name]).encode())
        for _ in range(data.draw(st.integers(1, 4))):
            encoded[data.draw(st.integers(0, len(encoded) - 1))] = data.draw(st.integers(0, 255))
        encoded = bytes(encoded[:data.draw(st.integers(0, len(encoded)))])
    else:  # correctly signed by its sender, with a hostile body: only the body checker stands between
        try:
            encoded = seal(SIGNER, name, mutate(data, valid_bodies()[name])).encode()
        except (OverflowError, ValueError, TypeError):
            return
    try:
        decode(encoded)
    except EnvelopeError:
        pass
    result = EnvelopeValidator().check(encoded, peer=SIGNER.peer_id_bytes)
    assert isinstance(result, (Envelope, Rejected))


# -- the framing reader --------------------------------------------------------------

class Feed:
    """A ByteStream over given bytes, delivered in the given pieces."""

    def __init__(self, data: bytes, cuts: list[int]):
        points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        self.pieces = [data[a:b] for a, b in zip(points, points[1:]) if b > a]
        self.sent: list[bytes] = []
        self.was_reset = False

    async def read(self, n: int) -> bytes:
        if self.was_reset or not self.pieces:
            return b""
        head = self.pieces[0]
        if len(head) > n:
            self.pieces[0] = head[n:]
            return head[:n]
        self.pieces.pop(0)
        return head

    async def write(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    async def close(self) -> None:
        pass

    async def reset(self) -> None:
        self.was_reset = True


def frame(obj) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


frames_strategy = st.lists(st.one_of(
    st.binary(max_size=40),                                            # garbage
    values.map(lambda v: frame(v) if _packable(v) else b""),           # well-framed structures
    st.integers(0, 2**32 - 1).map(lambda n: n.to_bytes(4, "big")),     # a bare header, any length
    st.just(frame({"blob": 5}) + b"abc"),                              # a blob cut short
    st.just(frame({"error": "no"})),
), max_size=6).map(b"".join)


def _packable(v) -> bool:
    try:
        msgpack.packb(v, use_bin_type=True)
        return True
    except Exception:
        return False


async def _drain(stream: FramedStream, blob: bool) -> None:
    for _ in range(20):
        if blob:
            async for _piece in stream.iter_blob(max_bytes=64):
                pass
        else:
            await stream.receive()


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), frames_strategy), cuts=st.lists(st.integers(0, 400), max_size=8),
       blob=st.booleans(), guarded=st.booleans())
def test_framing_reader_refuses_with_frameerror(data, cuts, blob, guarded):
    feed = Feed(data, cuts)
    budget = StreamBudget(StreamLimits(max_buffered_per_peer=64, max_buffered_total=64))
    guard = StreamGuard(budget, "peer", budget.limits, inbound=True) if guarded else None
    stream = FramedStream(feed, remote_peer="peer", max_frame=256, guard=guard)

    async def main():
        try:
            await _drain(stream, blob)
        except (FrameError, EOFError, RemoteError) as exc:
            if isinstance(exc, StreamLimitError):
                assert feed.was_reset  # a limit refusal always resets the stream
        stream.release()
        assert budget.buffered_total == 0  # nothing stays charged once the stream is done

    trio.run(main)


# -- stream protocol decoders --------------------------------------------------------

@FUZZ
@given(name=st.sampled_from(["propose", "countersign", "heartbeat", "end", "reject", "agreement"]),
       data=st.data())
def test_negotiation_parties_drop_hostile_messages(name, data):
    """Signed by the right peer, addressed to a live negotiation, with a mutated body:
    the parties drop or refuse it; they never raise."""
    prov = make_provider()
    cons = Consumer(C_ID, timeouts=TO)
    sends = cons.place(mk_bid(cores=2.0), [prov.asks["a1"]])
    answers = [a for s in sends for a in prov.receive(s.envelope.encode())]
    assert answers  # the valid proposal was answered (agreement): both sides are mid-negotiation
    body = mutate(data, valid_bodies()[name])
    signer, party = (P_ID, cons) if name in ("agreement", "reject") else (C_ID, prov)
    try:
        encoded = seal(signer, name, body).encode()
    except (OverflowError, ValueError, TypeError):
        return
    party.receive(encoded, signer.peer_id_bytes)
    party.receive(data.draw(st.binary(max_size=200)), signer.peer_id_bytes)


@FUZZ
@given(after=frames_strategy, cuts=st.lists(st.integers(0, 400), max_size=6), offer_body=st.data())
def test_transfer_receiver_refuses_with_transfererror(tmp_path_factory, after, cuts, offer_body):
    store = BlobStore(tmp_path_factory.mktemp("blobs"))
    body = valid_bodies()["blob.offer"]
    if offer_body.draw(st.booleans()):
        body = mutate(offer_body, body)
    try:
        offer = seal(SIGNER, "blob.offer", body).encode()
    except (OverflowError, ValueError, TypeError):
        return
    feed = Feed(frame({"offer": offer}) + after, cuts)
    stream = FramedStream(feed, remote_peer=SIGNER.peer_id)
    validator = EnvelopeValidator()

    def verify(data):
        env = validator.check(data) if isinstance(data, bytes) else Rejected("no")
        if isinstance(env, Rejected):
            raise TransferError(env.reason)
        return env

    async def authorize(peer, offer):
        return None

    async def main():
        try:
            await receive_file(stream, store, verify, authorize)
        except (TransferError, FrameError, EOFError):
            pass

    trio.run(main)


@FUZZ
@given(reply=st.one_of(st.binary(max_size=300), values.filter(_packable).map(
    lambda v: msgpack.packb(v, use_bin_type=True))))
def test_px_and_caps_sync_replies(reply):
    for parse in (parse_px_reply, parse_sync_reply):
        try:
            out = parse(reply)
        except ValueError:
            continue
        assert isinstance(out, list)
    try:
        peers = parse_px_reply(reply)
    except ValueError:
        return
    assert all(isinstance(p, str) and all(isinstance(a, str) for a in addrs) for p, addrs in peers)
