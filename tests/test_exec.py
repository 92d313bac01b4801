"""`synord exec` / `synord shell`: a command inside a running task's sandbox,
over /synord/shell/1.0.0, for the task's owner only.

Sandbox level: ContainerRuntime's exec (stdin, output, exit code, env, abort
kills the command, refused once the task ended) and the same in a real QEMU
microVM over its exec channel (with both flow-control windows overrun on
purpose). Mesh level, with real daemons: exec and shell into a container task
placed through the book, the exit code comes back, another peer is refused, a
finished job gives a clear error; exec into a microVM task."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time

import pytest
import trio

from synord.runtimes.base import ExecUnsupported, LogChunk, Sandbox, TaskSpec
from synord.runtimes.container import ContainerRuntime

from daemons import ROOT, wait_for
from sandbox_helpers import split_output

RT = ContainerRuntime()
_avail = RT.available()
needs_containers = pytest.mark.skipif(not _avail.available, reason=f"containers unavailable: {_avail.reason}")


def busybox_dir():
    from jobs_helpers import BUSYBOX_DIR, ensure_assets
    ensure_assets()
    return BUSYBOX_DIR


# ---- the interface ------------------------------------------------------------------------

class _Plain(Sandbox):
    async def start(self, nursery): ...
    async def wait(self): ...
    async def kill(self): ...

    async def logs(self):
        yield LogChunk("stdout", b"")


async def test_exec_is_unsupported_by_default():
    sb = _Plain()
    assert not sb.supports_exec
    with pytest.raises(ExecUnsupported, match="not supported"):
        async with sb.exec(["true"]):
            pass


async def test_wasm_says_exec_is_unsupported():
    from synord.runtimes.wasm import WasmSandbox
    assert not WasmSandbox.supports_exec
    with pytest.raises(ExecUnsupported, match="not supported"):
        async with Sandbox.exec(object.__new__(WasmSandbox), ["true"]):
            pass


def test_shell_exec_requests_with_a_terminal_are_checked():
    from synord.protocols.shell import check_exec, exec_body, terminal_size
    from synord.protocols.tasks import TaskSpecError
    assert exec_body("j1", ["sh"], tty=(24, 80))["tty"] == {"rows": 24, "cols": 80}
    assert terminal_size([50, 120]) == (50, 120)
    for tty in [{"rows": 0, "cols": 80}, {"rows": 24, "cols": 1001}, {"rows": True, "cols": 80},
                {"rows": 24}, {"rows": 24, "cols": 80, "x": 1}, [24, 80], {"rows": "24", "cols": 80}]:
        with pytest.raises(TaskSpecError):
            check_exec({"job_id": "j1", "argv": ["sh"], "tty": tty})
    for size in [[0, 1], [1], "24x80", [24.0, 80], None]:
        with pytest.raises(TaskSpecError):
            terminal_size(size)


def test_exec_channel_frames_and_start_requests():
    from synord.runtimes.base import SpecError
    from synord.runtimes.guest_exec import FrameSplitter, encode_frame, start_payload
    wire = b"boot noise" + encode_frame(b"o", b"\x01abc") + encode_frame(b"H") + encode_frame(b"x", b"\x010")
    for cut in range(len(wire) + 1):  # any split across reads gives the same items
        sp = FrameSplitter()
        items = sp.feed(wire[:cut]) + sp.feed(wire[cut:])
        frames = [i for i in items if isinstance(i, tuple)]
        assert frames == [(b"o", b"\x01abc"), (b"H", b""), (b"x", b"\x010")]
        assert b"".join(i for i in items if isinstance(i, bytes)) == b"boot noise"
    assert start_payload(7, ["sh", "-c", ""], {"A": "1"}) == b"\x07\x03sh\0-c\0\0A=1\0"
    for argv, env, match in [([], {}, "needs a command"), (["a\0b"], {}, "NUL"),
                             (["x"], {"A=B": "1"}, "invalid environment"),
                             (["x" * 5000], {}, "too long")]:
        with pytest.raises(SpecError, match=match):
            start_payload(1, argv, env)


# ---- ContainerRuntime directly ---------------------------------------------------------------

async def _only_the_tasks_sleep_is_left(sb) -> None:
    """The commands killed on leaving their blocks are gone; the task's sleep stays."""
    with trio.fail_after(60):
        async with sb.exec(["sh", "-c", "ps -o comm | grep -c '^sleep$'"]) as proc:
            out, _ = await split_output(proc.output)
    assert out == b"1\n"


async def _refused_once_ended(sb) -> None:
    with pytest.raises(ExecUnsupported, match="not running"):
        async with sb.exec(["true"]):
            pass


@needs_containers
async def test_container_exec_stdin_output_exit_code_env(tmp_path):
    sb = await RT.prepare(TaskSpec(kind="container", artifact=busybox_dir(), args=["sh", "-c", "sleep 30"],
                                   env={"TASK_VAR": "t"}, workdir=tmp_path / "wd"))
    async with trio.open_nursery() as n:
        await sb.start(n)
        try:
            with trio.fail_after(20):
                async with sb.exec(["sh", "-c", 'cat /proc/1/cmdline; echo; echo $((6*7)) $TASK_VAR $X; '
                                    'echo err >&2; read line; echo "got $line"; exit 5'],
                                   env={"X": "x"}) as proc:
                    await proc.send_stdin(b"hello\n")
                    await proc.close_stdin()
                    out, err = await split_output(proc.output)
                    code = await proc.wait()
            assert code == 5
            assert out == b"sleep\x0030\x00\n42 t x\ngot hello\n"
            assert err == b"err\n"
            # The command runs with the task's restrictions: no capabilities, no new privileges.
            async with sb.exec(["sh", "-c", "grep -E '^(CapEff|NoNewPrivs)' /proc/self/status"]) as proc:
                out, _ = await split_output(proc.output)
                assert await proc.wait() == 0
            assert b"CapEff:\t0000000000000000" in out and b"NoNewPrivs:\t1" in out
            # Leaving the block early kills the command inside the container.
            async with sb.exec(["sleep", "1000"]) as proc:
                await trio.sleep(0.3)
            assert proc.proc.returncode is not None
            await _only_the_tasks_sleep_is_left(sb)
        finally:
            await sb.kill()
    await _refused_once_ended(sb)


@needs_containers
async def test_runsc_container_exec(tmp_path):
    if not shutil.which("runsc"):
        pytest.skip("this machine has no runsc (gVisor) on PATH")
    sb = await RT.prepare(TaskSpec(kind="container", artifact=busybox_dir(), args=["sh", "-c", "sleep 30"],
                                   checkpointable=True, workdir=tmp_path / "wd"))
    async with trio.open_nursery() as n:
        await sb.start(n)
        try:
            with trio.fail_after(60):
                async with sb.exec(["sh", "-c", "echo $((6*7)); exit 3"]) as proc:
                    out, _ = await split_output(proc.output)
                    assert (await proc.wait(), out) == (3, b"42\n")
                async with sb.exec(["sleep", "1000"]) as proc:
                    await trio.sleep(0.5)
                async with sb.exec(["ps", "-o", "comm"]) as proc:
                    out, _ = await split_output(proc.output)
            assert out.split().count(b"sleep") == 1  # the aborted command is gone
        finally:
            await sb.kill()


@needs_containers
@pytest.mark.parametrize("engine", ["crun", "runc", "runsc"])
async def test_container_exec_on_a_terminal(tmp_path, engine):
    from synord.runtimes.base import TerminalSize
    if not shutil.which(engine):
        pytest.skip(f"this machine has no {engine} on PATH")
    rt = ContainerRuntime(engine=engine) if engine != "runsc" else RT
    sb = await rt.prepare(TaskSpec(kind="container", artifact=busybox_dir(), args=["sh", "-c", "sleep 30"],
                                   checkpointable=engine == "runsc", workdir=tmp_path / "wd"))
    assert sb.engine_name == engine
    seen = bytearray()

    async def until(token: bytes) -> None:
        with trio.fail_after(30):
            while token not in seen:
                await trio.sleep(0.05)
    async with trio.open_nursery() as n:
        await sb.start(n)
        try:
            async with sb.exec(["sh"], {"TERM": "xterm"}, tty=TerminalSize(24, 80)) as proc:
                async def read() -> None:
                    try:
                        async for chunk in proc.output:
                            assert chunk.stream == "stdout"  # a terminal has one stream
                            seen.extend(chunk.data)
                    except trio.ClosedResourceError:
                        pass  # the session was left (it ends its output then)
                n.start_soon(read)
                await proc.send_stdin(b"stty size; echo $((6*7))x\r")
                await until(b"24 80")
                await until(b"42x")
                await proc.resize(TerminalSize(40, 100))
                await proc.send_stdin(b"stty size\r")
                await until(b"40 100")
                await proc.send_stdin(b"sleep 1000\r")
                for _ in range(20):  # ^C reaches the foreground command (once it runs)
                    await trio.sleep(0.5)
                    await proc.send_stdin(b"\x03")
                    await trio.sleep(0.2)
                    await proc.send_stdin(b"echo after$((2*2))\r")
                    with trio.move_on_after(2):
                        await until(b"after4")
                        break
                await until(b"after4")
                await proc.send_stdin(b"exit 3\r")
                with trio.fail_after(30):
                    assert await proc.wait() == 3
        finally:
            await sb.kill()


@pytest.fixture(scope="module")
def vm_image(tmp_path_factory):
    from synord.runtimes.microvm import MicroVMRuntime
    from synord.runtimes.oci_build import build_busybox_image
    avail = MicroVMRuntime().available()
    if not avail.available:
        pytest.skip(f"microVMs unavailable: {avail.reason}")
    dest = tmp_path_factory.mktemp("vmimg") / "busybox"
    build_busybox_image(dest, entrypoint=["/bin/sh", "-c"], cmd=["sleep 120"],
                        env=["PATH=/bin", "TASK_VAR=t"])
    return dest


@pytest.mark.slow
async def test_microvm_exec_over_the_guest_exec_channel(vm_image):
    from synord.runtimes.microvm import MicroVMRuntime
    sb = await MicroVMRuntime().prepare(TaskSpec(kind="microvm", artifact=vm_image))
    async with trio.open_nursery() as n:
        await sb.start(n)
        try:
            with trio.fail_after(120):
                async with sb.exec(["sh", "-c", 'cat /proc/1/cmdline | tr "\\0" " "; echo; '
                                    'echo $((6*7)) $TASK_VAR $X; echo err >&2; read line; echo "got $line"; '
                                    'exit 5'], env={"X": "x"}) as proc:
                    await proc.send_stdin(b"hello\n")
                    out, err = await split_output(proc.output)
                    assert await proc.wait() == 5
            # PID 1 is our init; the task and the command share its root and environment.
            assert out == b"/init \n42 t x\ngot hello\n" and err == b"err\n"
            with trio.fail_after(120):
                # More stdin than the host may have in flight, more output than one
                # grant of credit: both windows have to turn over, nothing is lost.
                async with sb.exec(["sh", "-c", "wc -c; head -c 300000 /dev/zero | tr '\\0' a"]) as proc:
                    async def feed():
                        for _ in range(20):
                            await proc.send_stdin(b"x" * 10_000)
                        await proc.close_stdin()
                    n.start_soon(feed)
                    out, _ = await split_output(proc.output)
                    assert await proc.wait() == 0
            assert out == b"200000\n" + b"a" * 300_000
            with trio.fail_after(60):  # an empty argument is an argument
                async with sb.exec(["sh", "-c", 'echo "[$1]" "$#"', "zero", "", "two"]) as proc:
                    out, _ = await split_output(proc.output)
            assert out == b"[] 2\n"
            with trio.fail_after(60):
                async with sb.exec(["no-such-command"]) as proc:
                    out, err = await split_output(proc.output)
                    assert await proc.wait() == 127
            assert b"cannot execute no-such-command" in err
            with trio.fail_after(60):
                # Leaving the block early kills the command in the guest.
                async with sb.exec(["sleep", "1000"]) as proc:
                    await trio.sleep(0.3)
                assert proc.ended.is_set()
                # Sessions run side by side.
                results = []

                async def one(i):
                    async with sb.exec(["sh", "-c", f"sleep 0.3; echo {i}"]) as p:
                        results.append((await split_output(p.output))[0])
                async with trio.open_nursery() as m:
                    for i in range(3):
                        m.start_soon(one, i)
                assert sorted(results) == [b"0\n", b"1\n", b"2\n"]
            await _only_the_tasks_sleep_is_left(sb)
        finally:
            await sb.kill()
    await _refused_once_ended(sb)


@pytest.mark.slow
async def test_microvm_exec_after_a_restore(vm_image, tmp_path):
    from synord.runtimes.microvm import MicroVMRuntime
    rt = MicroVMRuntime()
    spec = TaskSpec(kind="microvm", artifact=vm_image)
    sb = await rt.prepare(spec)
    async with trio.open_nursery() as n:
        await sb.start(n)
        with trio.fail_after(120):
            async with sb.exec(["sh", "-c", "echo before > /tmp/mark"]) as proc:
                assert await proc.wait() == 0
            await sb.checkpoint(tmp_path / "ck")
    sb2 = await rt.restore(spec, tmp_path / "ck")
    async with trio.open_nursery() as n:
        await sb2.start(n)
        try:
            # The restored guest's init still serves its channel; the host handshakes anew.
            with trio.fail_after(120):
                async with sb2.exec(["cat", "/tmp/mark"]) as proc:
                    out, _ = await split_output(proc.output)
                    assert await proc.wait() == 0
            assert out == b"before\n"
        finally:
            await sb2.kill()


# ---- over the mesh ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    from daemons import DaemonCluster
    from jobs_helpers import ensure_assets, start_mesh
    if not _avail.available:
        pytest.skip(f"containers unavailable: {_avail.reason}")
    ensure_assets()
    with DaemonCluster(tmp_path_factory.mktemp("exec")) as cluster:
        consumer, provs = start_mesh(cluster, 1)
        yield consumer, provs[0]


def _running_task(consumer, *cmd: str) -> str:
    from jobs_helpers import submit, wait_job
    job_id = submit(consumer, "--runtime", "container", str(busybox_dir()), "--", *cmd)
    wait_job(consumer, job_id, states=("running",), timeout=60)
    return job_id


def test_exec_and_shell_in_a_running_container_task(mesh):
    consumer, provider = mesh
    job_id = _running_task(consumer, "sh", "-c", "sleep 30")
    res = consumer.cli("exec", job_id, "--", "cat", "/proc/1/cmdline")
    assert res.stdout.split("\0")[:2] == ["sleep", "30"]
    res = consumer.cli("exec", job_id, "--", "sh", "-c", "echo $((6*7)); echo oops >&2; exit 3", check=False)
    assert (res.returncode, res.stdout) == (3, "42\n")
    assert "oops\n" in res.stderr
    # A shell reads commands from (piped) stdin, line by line.
    res = subprocess.run([*_synord(consumer), "shell", job_id], input="echo hi $((1+1))\nexit 4\n",
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert (res.returncode, res.stdout) == (4, "hi 2\n"), res.stderr
    # exec -i forwards stdin; without -i the command sees it closed.
    res = subprocess.run([*_synord(consumer), "exec", "-i", job_id, "--", "tr", "a-z", "A-Z"],
                         input="abc\n", capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert (res.returncode, res.stdout) == (0, "ABC\n"), res.stderr
    # The same over the control API directly (NDJSON).
    lines = list(consumer.client.stream(f"/v1/jobs/{job_id}/exec", method="POST",
                                          body={"argv": ["cat"], "stdin": "via api\n"}))
    assert lines == [{"stream": "stdout", "data": "via api\n"}, {"exit_code": 0}]
    # The task itself is untouched.
    assert consumer.get(f"/v1/jobs/{job_id}")["state"] == "running"
    consumer.cli("cancel", job_id)


@pytest.mark.slow
def test_exec_and_shell_in_a_microvm_task(mesh):
    from jobs_helpers import BUSYBOX_TAR, submit, wait_job
    consumer, _ = mesh
    job_id = submit(consumer, "--runtime", "microvm", str(BUSYBOX_TAR), "--", "sh", "-c", "sleep 120")
    wait_job(consumer, job_id, states=("running",), timeout=120)
    res = consumer.cli("exec", job_id, "--", "sh", "-c", "uname -s; echo oops >&2; exit 3",
                       check=False, timeout=180)
    assert (res.returncode, res.stdout) == (3, "Linux\n"), res.stderr
    assert "oops\n" in res.stderr
    res = subprocess.run([*_synord(consumer), "shell", job_id], input="echo in the guest $((1+1))\nexit 4\n",
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert (res.returncode, res.stdout) == (4, "in the guest 2\n"), res.stderr
    _drive_a_terminal_shell(consumer, job_id)
    assert consumer.get(f"/v1/jobs/{job_id}")["state"] == "running"
    consumer.cli("cancel", job_id)


class _Terminal:
    """`synord shell` on a real pseudo-terminal of ours, as a person would run it."""

    def __init__(self, argv: list[str], rows: int, cols: int):
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                                     start_new_session=True)
        os.close(slave)
        self.seen = b""

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc.send_signal(signal.SIGWINCH)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def expect(self, token: bytes, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while token not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"never saw {token!r} on the terminal; it shows:\n{self.seen.decode(errors='replace')}"
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                try:
                    self.seen += os.read(self.master, 65536)
                except OSError:  # EIO: the CLI has exited
                    assert token in self.seen, self.seen.decode(errors="replace")

    def type_until(self, token: bytes, *keys: bytes, pause: float = 0.0, tries: int = 20) -> None:
        """Type ``keys`` (pausing before each) until ``token`` shows: for effects
        that land on their own time (a resize, ^C to a command just started)."""
        for _ in range(tries):
            for k in keys:
                time.sleep(pause)
                self.type(k)
            try:
                self.expect(token, timeout=2)
                return
            except AssertionError:
                continue
        self.expect(token, timeout=5)

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=60)
        finally:
            os.close(self.master)


def _drive_a_terminal_shell(consumer, job_id: str) -> None:
    """Prompt, window size (and its change), ^C to the remote foreground job, exit code."""
    term = _Terminal([*_synord(consumer), "shell", job_id], rows=30, cols=100)
    try:
        term.expect(b"# ", timeout=120)
        term.type(b"stty size; echo $((40+2))x\r")
        term.expect(b"30 100")
        term.expect(b"42x")
        term.resize(50, 120)
        term.type_until(b"50 120", b"stty size\r")  # the new size travels on its own
        term.type(b"sleep 1000\r")
        # ^C: the remote terminal's SIGINT to the remote sleep (once it runs)
        term.type_until(b"after4", b"\x03", b"echo after$((2*2))\r", pause=0.35)
        term.type(b"exit 3\r")
        assert term.close() == 3
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
            term.proc.wait()


def test_shell_on_a_terminal_in_a_container_task(mesh):
    consumer, _ = mesh
    job_id = _running_task(consumer, "sh", "-c", "sleep 60")
    _drive_a_terminal_shell(consumer, job_id)
    assert consumer.get(f"/v1/jobs/{job_id}")["state"] == "running"
    consumer.cli("cancel", job_id)


def test_a_consumer_that_goes_away_aborts_the_command(mesh):
    consumer, _ = mesh
    job_id = _running_task(consumer, "sh", "-c", "sleep 30")
    cli = subprocess.Popen([*_synord(consumer), "exec", job_id, "--", "sh", "-c", "echo started; exec sleep 1000"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        assert cli.stdout.readline() == b"started\n"
    finally:
        cli.kill()
        cli.wait()

    def sleeps() -> list[str]:
        out = consumer.cli("exec", job_id, "--", "ps", "-o", "args").stdout
        return [line for line in out.splitlines() if line.startswith("sleep")]
    wait_for(lambda: sleeps() == ["sleep 30"], 15, what="the abandoned command to be killed")
    consumer.cli("cancel", job_id)


INTRUDER = textwrap.dedent("""
    import json, sys, trio
    from synord.protocols.identity import Identity
    from synord.mesh_service import MeshService
    from synord.jobs.exec_client import ExecError, open_exec

    async def main(addr, job_id):
        svc = MeshService(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"], [], mdns=False)
        async with trio.open_nursery() as n:
            await n.start(svc.run)
            peer = await svc.mesh.dial(addr)
            try:
                client = await open_exec(svc.mesh, svc.identity, peer, job_id, ["echo", "pwned"])
                out = [e async for e in client.events()]
                print(json.dumps({"ok": True, "events": repr(out)}))
            except ExecError as exc:
                print(json.dumps({"ok": False, "code": exc.code, "error": str(exc)}))
            n.cancel_scope.cancel()

    trio.run(main, sys.argv[1], sys.argv[2])
""")


def test_another_peer_is_refused(mesh):
    consumer, provider = mesh
    job_id = _running_task(consumer, "sh", "-c", "sleep 30")
    addr = provider.p2p_addrs()[0]
    res = subprocess.run([sys.executable, "-c", INTRUDER, addr, job_id], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    answer = json.loads(res.stdout.strip().splitlines()[-1])
    assert answer["ok"] is False and answer["code"] == "forbidden", answer
    assert "only the consumer that placed job" in answer["error"]
    # The owner still can.
    assert consumer.cli("exec", job_id, "--", "echo", "mine").stdout == "mine\n"
    consumer.cli("cancel", job_id)


def test_exec_into_a_finished_job_is_a_clear_error(mesh):
    from jobs_helpers import submit, wait_job
    consumer, _ = mesh
    job_id = submit(consumer, "--runtime", "container", str(busybox_dir()), "--", "true")
    wait_job(consumer, job_id, states=("succeeded",), timeout=60)
    res = consumer.cli("exec", job_id, "--", "echo", "hi", check=False)
    assert res.returncode != 0 and res.stdout == ""
    assert res.stderr.strip() == f"synord: job {job_id} is not running (succeeded)"
    res = consumer.cli("exec", "nope", "--", "echo", check=False)
    assert res.returncode != 0 and "no job nope" in res.stderr


def _synord(d) -> list[str]:
    from daemons import SYNORD
    return [*SYNORD, "--home", str(d.home)]
