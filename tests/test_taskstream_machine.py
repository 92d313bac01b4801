"""The task stream machine (synord.protocols.taskstream), fed frames: no sockets, no sleeps.

Both roles run the same class; each side's frames come out of `send` and go
into the other side's `receive`, so the tests also pin the wire frames."""

import pytest

from synord.protocols import taskstream as ts
from synord.protocols.framing import CHUNK

SHA = "ab" * 32


def opened(have=None):
    """A consumer and a provider machine past the opening (STREAMING)."""
    c = ts.TaskStream(ts.CONSUMER, dict(have or {"stdout": 0, "stderr": 0}))
    p = ts.TaskStream(ts.PROVIDER, dict(have or {"stdout": 0, "stderr": 0}))
    c.send(ts.Open(b"envelope"))
    assert isinstance(c.receive(p.send(ts.Started())), ts.Started)
    return c, p


def test_the_wire_frames_are_the_documented_ones():
    assert ts.Started().frame() == {"started": True}
    assert ts.Output("stdout", 5, b"x").frame() == {"o": "stdout", "off": 5, "d": b"x"}
    assert ts.Heartbeat(7).frame() == {"hb": 7}
    assert ts.Checkpoint(SHA, 3, {"stdout": 1}, True).frame() == {
        "ckpt": {"sha256": SHA, "bytes": 3, "offsets": {"stdout": 1}, "final": True}}
    assert ts.Checkpoint(SHA, 3, {}, True, "peer").frame()["ckpt"]["pushed_to"] == "peer"
    assert ts.Blob(3).frame() == {"blob": 3}
    assert ts.Preempt(1.5, 99, "owner").frame() == {"preempt": {"grace_s": 1.5, "deadline_ms": 99,
                                                                "reason": "owner"}}
    assert set(ts.Exit(0, None, {}, None, False, {"stdout": 0, "stderr": 0}).frame()["exit"]) == {
        "code", "reason", "usage", "error", "handed_back", "offsets"}
    assert ts.Cancel().frame() == {"cancel": True}
    assert ts.CheckpointRequest(True).frame() == {"checkpoint": {"stop": True}}


def test_a_whole_run_output_checkpoint_exit():
    c, p = opened()
    for frame in p.output("stdout", 0, b"hello ") + p.output("stdout", 6, b"world"):
        ev = c.receive(frame)
        assert isinstance(ev, ts.Output)
    assert c.have == {"stdout": 11, "stderr": 0}
    assert isinstance(c.receive(p.send(ts.Heartbeat(1))), ts.Heartbeat)
    ck = c.receive(p.send(ts.Checkpoint(SHA, 10, {"stdout": 11}, False)))
    assert isinstance(ck, ts.Checkpoint) and c.state is ts.State.BLOB and p.state is ts.State.BLOB
    assert isinstance(c.receive(p.send(ts.Blob(10))), ts.Blob)
    assert c.state is ts.State.STREAMING
    ex = c.receive(p.send(ts.Exit(0, None, {"cpu_s": 1}, None, False, {"stdout": 11, "stderr": 0})))
    assert isinstance(ex, ts.Exit) and c.state is ts.State.EXITED
    assert c.gap() is None


def test_progress_comes_only_before_started():
    c = ts.TaskStream(ts.CONSUMER)
    p = ts.TaskStream(ts.PROVIDER)
    c.send(ts.Open(b"e"))
    ev = c.receive(p.send(ts.Progress("verifying")))
    assert ev == ts.Progress("verifying", None, None)
    bad = c.receive({"progress": {"phase": "mining bitcoin"}})
    assert isinstance(bad, ts.Refused) and bad.slug == "bad_progress_frame" and not bad.fatal
    c.receive(p.send(ts.Started()))
    late = c.receive({"progress": {"phase": "starting", "done": None, "total": None}})
    assert isinstance(late, ts.Refused) and late.slug == "wrong_order"


def test_output_before_started_is_refused():
    c = ts.TaskStream(ts.CONSUMER)
    c.send(ts.Open(b"e"))
    r = c.receive({"o": "stdout", "off": 0, "d": b"x"})
    assert isinstance(r, ts.Refused) and r.slug == "wrong_order" and c.state is ts.State.OPENING


def test_replayed_output_is_dropped_and_an_overlap_trimmed():
    c, _ = opened({"stdout": 5, "stderr": 0})
    assert c.receive({"o": "stdout", "off": 0, "d": b"12345"}) is None  # all of it we have
    ev = c.receive({"o": "stdout", "off": 3, "d": b"45678"})
    assert ev == ts.Output("stdout", 5, b"678") and c.have["stdout"] == 8


@pytest.mark.parametrize("frame, slug", [
    ({"o": "stdout", "off": 10, "d": b"x"}, "gap"),                       # past what we have
    ({"o": "stdout", "off": -1, "d": b"x"}, "bad_output_frame"),         # negative offset
    ({"o": "stdout", "off": True, "d": b"x"}, "bad_output_frame"),       # a bool is not an offset
    ({"o": "/etc/passwd", "off": 0, "d": b"x"}, "bad_output_frame"),     # not a stream
    ({"o": "stdout", "off": 0, "d": "text"}, "bad_output_frame"),        # not bytes
    ({"o": "stdout", "off": 0, "d": b"x" * (CHUNK + 1)}, "oversize_output"),
    (["not", "a", "map"], "not_a_map"),
    ({"whatever": 1}, "unknown_frame"),
])
def test_hostile_output_is_refused_and_leaves_the_offsets_alone(frame, slug):
    c, _ = opened()
    r = c.receive(frame)
    assert isinstance(r, ts.Refused) and r.slug == slug and not r.fatal
    assert c.have == {"stdout": 0, "stderr": 0} and c.state is ts.State.STREAMING


@pytest.mark.parametrize("info", [
    "not a map",
    {"sha256": "../../etc/passwd", "bytes": 1},                 # a digest names a file here
    {"sha256": SHA.upper(), "bytes": 1},
    {"sha256": SHA, "bytes": -1},
    {"sha256": SHA, "bytes": 1 << 40},                          # past MAX_BLOB_BYTES: a read loop
    {"sha256": SHA, "bytes": True},
    {"sha256": SHA, "bytes": 1, "offsets": {"stdout": -5}},
    {"sha256": SHA, "bytes": 1, "offsets": {"elsewhere": 5}},
    {"sha256": SHA, "bytes": 1, "pushed_to": 7},
])
def test_a_malformed_checkpoint_frame_is_fatal(info):
    c, _ = opened()
    r = c.receive({"ckpt": info})
    assert isinstance(r, ts.Refused) and r.slug == "bad_checkpoint_frame" and r.fatal
    assert c.state is ts.State.STREAMING and c.checkpoint is None


def test_the_blob_must_follow_its_checkpoint_with_its_size():
    c, p = opened()
    c.receive(p.send(ts.Checkpoint(SHA, 10, {}, False)))
    r = c.receive({"blob": 11})
    assert isinstance(r, ts.Refused) and r.slug == "bad_blob_header" and r.fatal
    r = c.receive({"o": "stdout", "off": 0, "d": b"x"})  # anything else in its place
    assert isinstance(r, ts.Refused) and r.slug == "wrong_order" and r.fatal
    r = ts.TaskStream(ts.CONSUMER).receive({"blob": 10})  # a blob nobody announced
    assert isinstance(r, ts.Refused) and r.fatal


def test_a_pushed_checkpoint_has_no_blob():
    c, p = opened()
    ev = c.receive(p.send(ts.Checkpoint(SHA, 10, {"stdout": 0}, True, "12D3KooNext")))
    assert ev.pushed_to == "12D3KooNext" and c.state is ts.State.STREAMING


def test_frames_after_exit_are_refused():
    c, p = opened()
    c.receive(p.send(ts.Exit(0, None, None, None, False, {"stdout": 0, "stderr": 0})))
    for frame in ({"o": "stdout", "off": 0, "d": b"late"}, {"hb": 1},
                  {"exit": {"code": 1}}, {"ckpt": {"sha256": SHA, "bytes": 1}}):
        r = c.receive(frame)
        assert isinstance(r, ts.Refused) and r.slug == "frame_after_exit", frame
    assert c.exit.code == 0 and c.have["stdout"] == 0
    with pytest.raises(ts.TaskStreamError):
        p.send(ts.Output("stdout", 0, b"after the end"))  # our own bug, not peer input


def test_the_exit_frame_says_what_is_missing():
    c, _ = opened()
    c.receive({"o": "stdout", "off": 0, "d": b"abc"})
    c.receive({"exit": {"code": 0, "offsets": {"stdout": 5, "stderr": 0}}})
    assert c.gap() == "stdout: received 3 of 5 bytes"
    c2, _ = opened()
    c2.receive({"exit": {"code": 0, "offsets": {"stdout": "many"}}})
    assert c2.gap() == "the provider did not say where the output ends"


def test_exit_and_preempt_content_is_normalised():
    c, _ = opened()
    n = c.receive({"preempt": {"grace_s": float("nan"), "deadline_ms": "soon", "reason": "x" * 5000}})
    assert n == ts.Preempt(0.0, 0, "x" * ts.MAX_TEXT)
    bad = c.receive({"preempt": ["no"]})
    assert isinstance(bad, ts.Refused) and bad.fatal
    ex = c.receive({"exit": {"code": "zero", "handed_back": "yes", "error": "e" * 5000}})
    assert ex.code is None and ex.handed_back is False and len(ex.error) == ts.MAX_TEXT


def test_roles_cannot_send_each_others_frames():
    c, p = opened()
    with pytest.raises(ts.TaskStreamError):
        c.send(ts.Output("stdout", 0, b"x"))
    with pytest.raises(ts.TaskStreamError):
        p.send(ts.Cancel())
    # a consumer frame arriving at the consumer is not a provider frame
    r = c.receive({"cancel": True})
    assert isinstance(r, ts.Refused) and r.slug == "unknown_frame"


def test_the_provider_reads_cancel_and_checkpoint_requests():
    c, p = opened()
    assert isinstance(p.receive(c.send(ts.Cancel())), ts.Cancel)
    push = {"peer": "12D3KooNext", "grant": b"g", "addrs": []}
    ev = p.receive(c.send(ts.CheckpointRequest(True, push)))
    assert ev == ts.CheckpointRequest(True, push)
    broken = p.receive({"checkpoint": {"stop": True, "push_to": {"peer": 5}}})
    assert broken == ts.CheckpointRequest(True, None)  # goes through the consumer instead
    assert isinstance(p.receive("garbage"), ts.Refused)
    p.send(ts.Exit(0, None, None, None, False, {"stdout": 0, "stderr": 0}))
    late = p.receive({"checkpoint": {"stop": False}})
    assert isinstance(late, ts.Refused) and late.slug == "frame_after_exit"
    assert isinstance(p.receive({"cancel": True}), ts.Cancel)  # a cancel crossing the exit: harmless


def test_an_error_ends_the_stream():
    c = ts.TaskStream(ts.CONSUMER)
    c.send(ts.Open(b"e"))
    ev = c.receive({"error": "no active agreement for this task"})
    assert ev == ts.Error("no active agreement for this task") and c.done
