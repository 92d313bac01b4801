"""`synord run --port` and `synord forward`: TCP from the consumer's loopback to
a port inside a task's sandbox, over /synord/forward/1, for the owner only.

Without sockets: the port rule, the `forward.open` body, the `ForwardChannel`
machine (both roles, every violation), ports in the proposal and the signed
terms, and the relay driver over in-memory streams. With real daemons: busybox
httpd in a container task answers HTTP through `synord forward`; stopping the
CLI closes the listener; cancelling the job ends its connections; another
peer, and a port outside the agreement, are refused and counted."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import trio
import trio.testing

from synord.protocols.forward import (ACCEPTER, MAX_CHUNK, OPENER, Accepted, Data, Eof, ForwardChannel,
                                      ForwardViolation, Refused, State, check_open, open_body)
from synord.protocols.ports import MAX_PORTS, check_ports
from synord.protocols.tasks import TaskSpecError

from daemons import ROOT, wait_for
from test_mesh import _Mem  # framing's ByteStream over an in-memory trio stream

# ---- the rules, without sockets -----------------------------------------------------------------


def test_ports_are_checked_and_normalised():
    assert check_ports(None) == () and check_ports([]) == ()
    assert check_ports([9000, 80, 8080]) == (80, 8080, 9000)
    for bad, why in [([0], "1..65535"), ([65536], "1..65535"), ([True], "1..65535"), (["80"], "1..65535"),
                     ([80, 80], "distinct"), (list(range(1, MAX_PORTS + 2)), "at most"), ("80", "list")]:
        with pytest.raises(ValueError, match=why):
            check_ports(bad)


def test_task_start_carries_sorted_ports_only_when_there_are_some():
    from synord.jobs.spec import JobSpec
    from synord.protocols.tasks import check_start
    spec = JobSpec(kind="container", sha256="a" * 64, ports=(80, 8080))
    body = spec.task_start("job1", "b" * 32, 0, None)
    check_start(body)
    assert body["ports"] == [80, 8080] and JobSpec.from_task_start(body).ports == (80, 8080)
    assert "ports" not in JobSpec(kind="container", sha256="a" * 64).task_start("job1", "b" * 32, 0, None)
    assert JobSpec.from_stored(spec.to_stored()).ports == (80, 8080) and spec.needs().ports == (80, 8080)
    for ports in [[8080, 80], [], [0], [80, 80]]:
        with pytest.raises(TaskSpecError):
            check_start({**body, "ports": ports})


def test_the_open_request_is_checked():
    assert open_body("job-1", 8080) == {"job_id": "job-1", "port": 8080}
    assert open_body("job-1", 8080, check=True)["check"] is True
    for body in [{"job_id": "j", "port": 0}, {"job_id": "j", "port": 65536}, {"job_id": "j", "port": True},
                 {"job_id": "j"}, {"job_id": "j", "port": 80, "host": "10.0.0.1"},
                 {"job_id": "../x", "port": 80}, {"job_id": "j", "port": 80, "check": "yes"}, [80]]:
        with pytest.raises(TaskSpecError):
            check_open(body)


def test_a_channel_relays_both_ways_and_ends_at_both_eofs():
    opener, accepter = ForwardChannel(OPENER), ForwardChannel(ACCEPTER)
    accepter.accepted()
    assert opener.receive({"ok": True}) == Accepted() and opener.state is State.OPEN
    opener.sent_data(3)
    assert accepter.receive({"d": b"abc"}) == Data(b"abc")
    accepter.sent_data(MAX_CHUNK)
    assert opener.receive({"d": b"x" * MAX_CHUNK}) == Data(b"x" * MAX_CHUNK)
    opener.sent_eof()
    assert accepter.receive({"eof": True}) == Eof() and not accepter.done
    accepter.sent_data(1)  # a half-closed connection still answers
    assert opener.receive({"d": b"!"}) == Data(b"!")
    accepter.sent_eof()
    assert opener.receive({"eof": True}) == Eof()
    assert opener.done and accepter.done and opener.state is State.CLOSED
    assert (opener.sent, opener.received, accepter.received) == (3, MAX_CHUNK + 1, 3)


def test_a_refusal_names_one_of_our_codes():
    ch = ForwardChannel(OPENER)
    assert ch.receive({"error": "permission denied", "code": "forbidden"}) == Refused("forbidden", "permission denied")
    assert ch.done
    ch = ForwardChannel(OPENER)
    assert ch.receive({"error": "x" * 1000, "code": "made-up code"}) == Refused("failed", "x" * 300)


@pytest.mark.parametrize("role, setup, frame, slug", [
    (ACCEPTER, [], {"d": b"early"}, "unexpected_frame"),          # data before the answer
    (OPENER, [], {"d": b"early"}, "unexpected_frame"),
    (OPENER, ["open"], {"d": b"x" * (MAX_CHUNK + 1)}, "oversize"),
    (OPENER, ["open"], {"d": b""}, "bad_frame"),
    (OPENER, ["open"], {"d": "text"}, "bad_frame"),
    (OPENER, ["open"], {"d": b"a", "eof": True}, "bad_frame"),
    (OPENER, ["open"], [b"a"], "bad_frame"),
    (OPENER, ["open"], {"what": 1}, "unexpected_frame"),
    (OPENER, ["open", "eof"], {"d": b"late"}, "data_after_eof"),
    (OPENER, ["open", "eof"], {"eof": True}, "duplicate_eof"),
    (OPENER, ["open", "eof", "our_eof"], {"d": b"after"}, "after_close"),
])
def test_violations_end_the_channel_with_a_slug(role, setup, frame, slug):
    ch = ForwardChannel(role)
    for step in setup:
        if step == "open":
            ch.receive({"ok": True})
        elif step == "eof":
            ch.receive({"eof": True})
        elif step == "our_eof":
            ch.sent_eof()
    with pytest.raises(ForwardViolation) as exc:
        ch.receive(frame)
    assert exc.value.slug == slug and ch.state is State.CLOSED


def test_we_cannot_send_what_the_rules_forbid():
    ch = ForwardChannel(OPENER)
    with pytest.raises(RuntimeError):
        ch.sent_data(1)  # before the answer
    with pytest.raises(RuntimeError):
        ch.accepted()  # only the accepter answers
    ch.receive({"ok": True})
    with pytest.raises(RuntimeError):
        ch.sent_data(MAX_CHUNK + 1)
    ch.sent_eof()
    with pytest.raises(RuntimeError):
        ch.sent_data(1)


async def test_sandboxes_that_cannot_forward_say_so_in_one_line():
    from pathlib import Path
    from synord.runtimes.base import ForwardUnsupported, TaskSpec
    from synord.runtimes.container import ContainerSandbox
    from synord.runtimes.microvm import MicroVMSandbox
    from synord.runtimes.wasm import WasmSandbox
    for cls, kind, engine, message in [
            (MicroVMSandbox, "microvm", None, "forward to microvm tasks is not supported yet"),
            (WasmSandbox, "wasm", None, "forward to wasm tasks is not supported yet"),
            (ContainerSandbox, "container", "runsc",
             "forward to gVisor (checkpointable) container tasks is not supported yet")]:
        sb = object.__new__(cls)
        sb.spec = TaskSpec(kind=kind, artifact=Path("/nonexistent"))
        sb.engine_name = engine
        assert sb.forward_unsupported() == message
        with pytest.raises(ForwardUnsupported, match=re.escape(message)):
            await sb.connect_port(8080)
    sb = object.__new__(ContainerSandbox)
    sb.engine_name = "crun"
    assert sb.forward_unsupported() is None


def _terms(ports=()):
    from synord.protocols.negotiation import Terms
    return Terms(aid=b"a" * 16, nid=b"n" * 16, consumer="c", provider="p", ask_id="ask", ask_seq=1,
                 bid_id="bid", bid_seq=1, resource_class="cpu", cores=1.0, memory=1 << 28, gpus=0,
                 gpu_class=None, runtime="container", price=1.0, units=1.0, duration_s=60,
                 heartbeat_ms=1000, created=1, expires=2, ports=ports)


def test_ports_are_part_of_the_signed_terms_and_the_proposal():
    from synord.protocols.negotiation import BodyError, Propose, Terms
    t = _terms((80, 8080))
    assert Terms.from_body(t.to_body()) == t
    assert t.signing_input() != _terms().signing_input() != _terms((80,)).signing_input()
    assert "ports" not in _terms().to_body()  # agreements without ports sign as before
    for bad in [[8080, 80], [], [0]]:
        with pytest.raises(BodyError):
            Terms.from_body({**t.to_body(), "ports": bad})
    p = Propose(b"n" * 16, "p", "ask", 1, "bid", 1, "cpu", 1.0, 1 << 28, "container", 2.0, 60, ports=(8080,))
    assert Propose.from_body(p.to_body()) == p


def test_the_consumer_refuses_an_agreement_with_other_ports():
    from synord.protocols.identity import Identity
    from synord.protocols.negotiation import CONSUMER, Agreement, Negotiation, NegotiationError, Propose, Timeouts
    from dataclasses import replace
    prov, cons = Identity.generate(), Identity.generate()
    p = Propose(b"n" * 16, prov.peer_id, "ask", 1, "bid", 1, "cpu", 1.0, 1 << 28, "container", 2.0, 60,
                ports=(8080,))
    for ports, ok in [((8080,), True), ((), False), ((8080, 9000), False)]:
        m = Negotiation(CONSUMER, p.nid, cons.peer_id, prov.peer_id, Timeouts())
        m.send(p, 0)
        terms = replace(_terms(ports), nid=p.nid, consumer=cons.peer_id, provider=prov.peer_id,
                        ask_id="ask", bid_id="bid", created=0, expires=60_000)
        agreement = Agreement(terms, terms.sign(prov))
        if ok:
            m.receive(agreement, 1)
        else:
            with pytest.raises(NegotiationError, match="ports"):
                m.receive(agreement, 1)


async def test_the_relay_moves_bytes_both_ways_and_closes_on_both_eofs():
    """The driver, over in-memory streams: one side is the socket, the other the mesh stream."""
    from synord.jobs.forward_relay import relay
    from synord.protocols.framing import FramedStream

    sock_ours, sock_app = trio.testing.memory_stream_pair()
    mesh_ours, mesh_peer = trio.testing.lockstep_stream_pair()
    ours, peer = FramedStream(_Mem(mesh_ours)), FramedStream(_Mem(mesh_peer))
    channel = ForwardChannel(ACCEPTER)
    channel.accepted()
    big = os.urandom(3 * MAX_CHUNK + 17)
    got = bytearray()
    async with trio.open_nursery() as n:
        result = []

        async def run_relay():
            result.append(await relay(ours, sock_ours, channel, 30, "test"))
        n.start_soon(run_relay)
        await sock_app.send_all(b"request")
        await sock_app.send_eof()
        frames = []
        while True:
            f = await peer.receive()
            frames.append(f)
            if f == {"eof": True}:
                break
        assert b"".join(f["d"] for f in frames[:-1]) == b"request"
        for i in range(0, len(big), MAX_CHUNK):
            await peer.send({"d": big[i:i + MAX_CHUNK]})
        await peer.send({"eof": True})
        while chunk := await sock_app.receive_some(65536):
            got += chunk
    assert bytes(got) == big
    assert result[0].how == "closed" and (result[0].sent, result[0].received) == (7, len(big))


@pytest.mark.parametrize("frame, slug", [
    ({"d": b"x" * (MAX_CHUNK + 1)}, "oversize"),   # one byte over: the machine says so
    ({"d": b"x" * (1 << 20)}, "oversize"),         # far over: refused by its header, never read
    ({"d": b"x", "more": 1}, "bad_frame"),
    ({"hello": True}, "unexpected_frame"),
])
async def test_the_relay_ends_on_a_violation_and_counts_it(frame, slug):
    from synord.jobs.forward_relay import relay
    from synord.protocols.framing import FramedStream
    from synord.protocols.refusals import REFUSALS

    sock_ours, sock_app = trio.testing.memory_stream_pair()
    mesh_ours, mesh_peer = trio.testing.memory_stream_pair()
    ours, peer = FramedStream(_Mem(mesh_ours)), FramedStream(_Mem(mesh_peer))
    channel = ForwardChannel(OPENER)
    channel.receive({"ok": True})
    before = REFUSALS.get("test_relay", slug)
    await peer.send(frame)
    with trio.fail_after(10):
        out = await relay(ours, sock_ours, channel, 30, "test_relay")
    assert out.how == "violation" and REFUSALS.get("test_relay", slug) == before + 1
    assert await sock_app.receive_some(10) == b""  # the socket side was closed


async def test_the_relay_gives_up_on_an_idle_connection():
    from synord.jobs.forward_relay import relay
    from synord.protocols.framing import FramedStream

    sock_ours, _sock_app = trio.testing.memory_stream_pair()
    mesh_ours, _mesh_peer = trio.testing.memory_stream_pair()
    channel = ForwardChannel(OPENER)
    channel.receive({"ok": True})
    with trio.fail_after(10):
        out = await relay(FramedStream(_Mem(mesh_ours)), sock_ours, channel, 0.2, "test")
    assert out.how == "idle"


# ---- with real daemons ---------------------------------------------------------------------

def _skip_unless_forwardable() -> None:
    from jobs_helpers import ensure_assets
    from synord.runtimes.container import ContainerRuntime
    avail = ContainerRuntime().available()
    if not avail.available:
        pytest.skip(f"containers unavailable: {avail.reason}")
    if os.geteuid() != 0:
        pytest.skip("forward enters the task's network namespace: needs a root daemon")
    ensure_assets()


HTTPD = ("mkdir -p /tmp/www && echo hello from the sandbox > /tmp/www/index.html && "
         "head -c 3000000 /dev/urandom > /tmp/www/big && md5sum /tmp/www/big && "
         "httpd -p 8081 -h /tmp/www && exec httpd -f -p 8080 -h /tmp/www")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    from daemons import DaemonCluster
    from jobs_helpers import CONSUMER_ONLY, start_mesh
    _skip_unless_forwardable()
    with DaemonCluster(tmp_path_factory.mktemp("forward")) as cluster:
        consumer, provs = start_mesh(cluster, 1)
        other = cluster.start("other", bootstrap=consumer.p2p_addrs(), config=CONSUMER_ONLY)
        yield consumer, provs[0], other


def _httpd_job(consumer, *ports: str) -> str:
    from jobs_helpers import BUSYBOX_DIR, submit, wait_job
    flags = [a for p in ports for a in ("--port", p)]
    job_id = submit(consumer, "--runtime", "container", *flags, str(BUSYBOX_DIR), "--", "sh", "-c", HTTPD)
    wait_job(consumer, job_id, states=("running",), timeout=90)
    return job_id


class _Forward:
    """`synord forward --json` running in the background, as a user runs it."""

    def __init__(self, d, *args: str):
        from daemons import SYNORD
        self.proc = subprocess.Popen([*SYNORD, "--home", str(d.home), "forward", "--json", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        first = self.proc.stdout.readline()
        assert first, f"synord forward printed nothing: {self.proc.stderr.read()}"
        self.first = json.loads(first)
        self.port = self.first["local"]

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.proc.stdout.close()
            self.proc.stderr.close()


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _md5_in_log(consumer, job_id: str) -> str:
    from jobs_helpers import output
    line = wait_for(lambda: next((ln for ln in output(consumer, job_id).splitlines() if "/tmp/www/big" in ln), None),
                    30, what="the file's md5 in the job's output")
    return line.split()[0]


def _sockets_and_threads(d) -> tuple[int, int]:
    fds = os.listdir(f"/proc/{d.pid}/fd")
    socks = sum(1 for fd in fds if _link(f"/proc/{d.pid}/fd/{fd}").startswith("socket:"))
    return socks, len(os.listdir(f"/proc/{d.pid}/task"))


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def test_forward_serves_http_from_inside_the_sandbox(mesh):
    from concurrent.futures import ThreadPoolExecutor
    consumer, provider, _ = mesh
    job_id = _httpd_job(consumer, "8080")
    socks, threads = _sockets_and_threads(provider)
    fwd = _Forward(consumer, job_id, "8080")
    try:
        assert fwd.first["listening"] == f"127.0.0.1:{fwd.port}" and fwd.first["remote"] == 8080
        status, body = wait_for(lambda: (r := _get(fwd.port, "/index.html"))[0] == 200 and r, 30,
                                what="httpd to answer through the forward")
        assert body == b"hello from the sandbox\n"
        # Several connections at once, each with all its bytes.
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: _get(fwd.port, "/big"), range(4)))
        md5 = _md5_in_log(consumer, job_id)
        assert all(s == 200 and hashlib.md5(b).hexdigest() == md5 and len(b) == 3_000_000 for s, b in results)
    finally:
        assert fwd.close() == 0
    # Stopping `synord forward` closes its listener.
    wait_for(lambda: _refused(fwd.port), 15, what="the local port to close")
    # The provider kept no socket and no thread of any of those connections.
    wait_for(lambda: (now := _sockets_and_threads(provider))[0] <= socks and now[1] <= threads, 30,
             what=f"the provider back to {socks} sockets and {threads} threads")
    consumer.cli("cancel", job_id)


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return False
    except ConnectionRefusedError:
        return True


def test_cancelling_the_job_ends_its_forwards(mesh):
    from jobs_helpers import wait_job
    consumer, provider, _ = mesh
    job_id = _httpd_job(consumer, "8080")
    with socket.socket() as s:  # a free port, for the LOCAL:REMOTE form
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    fwd = _Forward(consumer, job_id, f"{free}:8080")
    assert fwd.port == free
    try:
        wait_for(lambda: _get(fwd.port, "/index.html")[0] == 200, 30, what="httpd through the forward")
        # As many connections as a job may have at once (httpd waits for their requests)...
        held = [socket.create_connection(("127.0.0.1", fwd.port), timeout=60) for _ in range(16)]
        for s in held:  # each is through to httpd: it answers a request's first line
            s.sendall(b"GET /index.html HTTP/1.1\r\nHost: x\r\n")
        # ... and one more, closed at once and said so.
        extra = socket.create_connection(("127.0.0.1", fwd.port), timeout=60)
        assert _closed(extra)
        extra.close()
        consumer.cli("cancel", job_id)
        wait_job(consumer, job_id, states=("cancelled",), timeout=60)
        for s in held:  # every held connection is closed (or reset), none left hanging
            assert _closed(s)
            s.close()
        assert fwd.proc.wait(timeout=30) == 1  # the CLI says the forward ended
        lines = [json.loads(line) for line in fwd.proc.stdout.read().splitlines()]
        assert {"error": "more than 16 connections at once: one refused"} in lines
        assert "no longer running" in lines[-1]["ended"]
    finally:
        fwd.close()
    assert _refused(fwd.port)


INTRUDER = textwrap.dedent("""
    import json, sys, trio
    from synord.protocols.identity import Identity, load
    from synord.mesh_service import MeshService
    from synord.jobs.forward_client import ForwardError, open_forward

    async def main(addr, job_id, port, key):
        ident = load(key) if key else Identity.generate()
        svc = MeshService(ident, ["/ip4/127.0.0.1/tcp/0"], [], mdns=False)
        async with trio.open_nursery() as n:
            await n.start(svc.run)
            peer = await svc.mesh.dial(addr)
            try:
                stream, _ = await open_forward(svc.mesh, svc.identity, peer, job_id, int(port))
                print(json.dumps({"ok": True}))
            except ForwardError as exc:
                print(json.dumps({"ok": False, "code": exc.code, "error": str(exc)}))
            n.cancel_scope.cancel()

    trio.run(main, *sys.argv[1:5])
""")


def _intrude(provider, job_id: str, port: int, key: str = "", script: str = INTRUDER) -> dict:
    res = subprocess.run([sys.executable, "-c", script, provider.p2p_addrs()[0], job_id, str(port), key],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_forward_is_refused_for_a_non_owner(mesh):
    from jobs_helpers import refused
    consumer, provider, other = mesh
    job_id = _httpd_job(consumer, "8080")
    # Another consumer's daemon does not know the job at all...
    res = other.cli("forward", job_id, "8080", check=False)
    assert res.returncode != 0 and res.stderr.strip() == f"synord: no job {job_id}"
    # ... and a peer that asks the provider directly is refused there, and counted.
    before = refused(provider, "forward", "forbidden")
    answer = _intrude(provider, job_id, 8080)
    assert answer["ok"] is False and answer["code"] == "forbidden", answer
    assert "only the consumer that placed job" in answer["error"]
    assert refused(provider, "forward", "forbidden") == before + 1
    consumer.cli("cancel", job_id)


# The owner's own key, breaking the protocol once its connection is accepted.
HOSTILE_OWNER = INTRUDER.replace(
    'print(json.dumps({"ok": True}))',
    'await stream.send({"d": b"x" * 70000})\n'
    '            try:\n'
    '                print(json.dumps({"ok": True, "after": repr(await stream.receive())}))\n'
    '            except Exception as exc:\n'
    '                print(json.dumps({"ok": True, "after": type(exc).__name__}))')


def test_an_owner_breaking_the_protocol_is_cut_off_and_counted(mesh):
    from jobs_helpers import refused
    consumer, provider, _ = mesh
    job_id = _httpd_job(consumer, "8080")
    wait_for(lambda: _intrude(provider, job_id, 8080, str(consumer.home / "identity.key"))["ok"], 30,
             what="httpd to accept a forwarded connection")
    before = refused(provider, "forward", "oversize")
    answer = _intrude(provider, job_id, 8080, str(consumer.home / "identity.key"), HOSTILE_OWNER)
    assert answer == {"ok": True, "after": "EOFError"}, answer  # the stream is reset, nothing comes back
    wait_for(lambda: refused(provider, "forward", "oversize") == before + 1, 10, what="the refusal counted")
    # (Not asserted: the job's state. A second process speaking with the consumer's own
    # key replaces the daemon's connection to the provider, which may move the task.)
    consumer.cli("cancel", job_id)


def test_forward_to_a_port_outside_the_agreement_is_refused(mesh):
    from jobs_helpers import refused
    consumer, provider, _ = mesh
    job_id = _httpd_job(consumer, "8080")  # httpd listens on 8081 too, but the job exposes only 8080
    res = consumer.cli("forward", job_id, "8081", check=False)
    assert res.returncode != 0
    assert res.stderr.strip() == f"synord: port 8081 is not exposed by job {job_id} (its ports: 8080)"
    # The owner's own key asking the provider directly: the agreement decides, not the consumer daemon.
    before = refused(provider, "forward", "port_not_agreed")
    answer = _intrude(provider, job_id, 8081, key=str(consumer.home / "identity.key"))
    assert answer["ok"] is False and answer["code"] == "port_not_agreed", answer
    assert "(its agreement names: 8080)" in answer["error"]
    assert refused(provider, "forward", "port_not_agreed") == before + 1
    consumer.cli("cancel", job_id)


def test_bad_ports_are_one_line_errors(mesh):
    from jobs_helpers import BUSYBOX_DIR, PROBE_WASM
    consumer, _, _ = mesh
    res = consumer.cli("run", "--port", "70000", str(BUSYBOX_DIR), "--", "true", check=False)
    assert res.returncode == 2 and "port 70000 is outside 1..65535" in res.stderr
    res = consumer.cli("run", "--detach", "--port", "80", "--port", "80", str(BUSYBOX_DIR), "--", "true", check=False)
    assert res.returncode != 0 and res.stderr.strip() == "synord: bad task: ports must be distinct"
    res = consumer.cli("run", "--detach", "--port", "80", str(PROBE_WASM), check=False)
    assert res.returncode != 0 and "a wasm task has no network" in res.stderr
    res = consumer.cli("forward", "nope", "8080", check=False)
    assert res.returncode != 0 and res.stderr.strip() == "synord: no job nope"
    # The control API's forward needs the token, as every route does.
    from urllib.parse import urlsplit
    url = urlsplit(consumer.client.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request("POST", "/v1/jobs/nope/forward", body=b'{"remote": 8080}',
                     headers={"Host": "127.0.0.1", "Content-Type": "application/json"})
        assert conn.getresponse().status == 401
    finally:
        conn.close()


def test_a_forward_follows_its_job_to_the_next_provider(tmp_path):
    """The provider is paused: the task restarts on the other one, and the same
    `synord forward` reaches it there (the old provider closed its connections)."""
    from daemons import DaemonCluster
    from jobs_helpers import BUSYBOX_DIR, job, start_mesh, submit, wait_job
    _skip_unless_forwardable()
    with DaemonCluster(tmp_path) as cluster:
        consumer, provs = start_mesh(cluster, 2)
        job_id = submit(consumer, "--runtime", "container", "--port", "8080", str(BUSYBOX_DIR), "--", "sh", "-c",
                        "mkdir -p /tmp/www && cat /proc/sys/kernel/random/uuid > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www")
        first_id = wait_job(consumer, job_id, states=("running",), timeout=90)["provider"]
        first = next(p for p in provs if p.status()["peer_id"] == first_id)
        fwd = _Forward(consumer, job_id, "8080")
        try:
            _, before = wait_for(lambda: (r := _get(fwd.port, "/index.html"))[0] == 200 and r, 30,
                                 what="httpd through the forward")
            held = socket.create_connection(("127.0.0.1", fwd.port), timeout=60)
            assert first.post("/v1/pause")["tasks_handed_back"] == 1
            wait_for(lambda: (j := job(consumer, job_id))["state"] == "running" and j["provider"] != first_id, 120,
                     what="the job running on the other provider")
            assert _closed(held)  # the old provider closed what it carried
            held.close()
            _, after = wait_for(lambda: (r := _get(fwd.port, "/index.html"))[0] == 200 and r, 30,
                                what="httpd through the same forward, on the next provider")
            assert after != before and len(after) == 37  # another sandbox (its own random id) answers
            assert fwd.proc.poll() is None
        finally:
            fwd.close()
        consumer.cli("cancel", job_id)
