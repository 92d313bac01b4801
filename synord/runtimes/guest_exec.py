"""Commands beside a microVM's task (``synord exec`` / ``synord shell``): the host
half of the guest's exec channel, a second UART (/dev/ttyS1) that QEMU joins to
a Unix socket.

Wire format and the guest half are in packaging/guest/init.c: frames
``"\\x01SY" kind len:u16be payload``; session frames start with the session id.
Both directions are windowed like an SSH channel: the host keeps at most
``STDIN_WINDOW`` stdin bytes unacknowledged per session, and the guest sends
output only against credit the host grants as its reader consumes it — so a
command that floods its output, or one that never reads stdin, blocks only
itself.

`FrameSplitter` (also used for the task console) and `encode_frame` are pure;
`ExecChannel` does the I/O and lives in the sandbox's supervising nursery.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import trio

from .base import ExecProcess, ExecUnsupported, LogChunk, SpecError, TerminalSize

log = logging.getLogger(__name__)

FRAME_MAGIC = b"\x01SY"
MAX_PAYLOAD = 4096          # the guest's frame buffer
STDIN_WINDOW = 65536        # must not exceed the guest's EXEC_WINDOW
OUTPUT_CREDIT = 65536       # output the guest may send before we read any of it
MAX_SESSIONS = 8            # the guest's MAXSESS
KILLED_CODE = 137
HANDSHAKE_RETRY_S = 0.5


def encode_frame(kind: bytes, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return FRAME_MAGIC + kind + len(payload).to_bytes(2, "big") + payload


class FrameSplitter:
    """Bytes in, frames ``(kind, payload)`` and noise ``bytes`` out, in order."""

    def __init__(self, pending: bytes = b"") -> None:
        self.pending = pending  # a frame cut in half, or a magic split across reads

    def feed(self, data: bytes) -> list[tuple[bytes, bytes] | bytes]:
        buf = self.pending + data
        out: list[tuple[bytes, bytes] | bytes] = []
        while buf:
            i = buf.find(FRAME_MAGIC)
            if i < 0:
                keep = next((k for k in (2, 1) if buf.endswith(FRAME_MAGIC[:k])), 0)
                if len(buf) > keep:
                    out.append(buf[:len(buf) - keep])
                buf = buf[len(buf) - keep:]
                break
            if i:
                out.append(buf[:i])
                buf = buf[i:]
            if len(buf) < 6:
                break
            length = int.from_bytes(buf[4:6], "big")
            if len(buf) < 6 + length:
                break
            out.append((buf[3:4], buf[6:6 + length]))
            buf = buf[6 + length:]
        self.pending = buf
        return out


def start_payload(sid: int, argv: list[str], env: dict[str, str], tty: TerminalSize | None = None) -> bytes:
    """The payload of an 'S' frame (a ``tty`` one: 'T'); SpecError where the guest could not take it."""
    if not argv or not argv[0]:
        raise SpecError("exec needs a command")
    for k, v in env.items():
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise SpecError(f"invalid environment variable {k!r}")
    if any("\0" in a for a in argv):
        raise SpecError("arguments cannot contain NUL bytes")
    size = b"" if tty is None else tty.rows.to_bytes(2, "big") + tty.cols.to_bytes(2, "big")
    if len(argv) > 255 or len(env) > 255:
        raise SpecError("a microVM exec takes at most 255 arguments and 255 variables")
    body = (bytes([sid]) + size + bytes([len(argv)]) + b"".join(a.encode() + b"\0" for a in argv)
            + b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()))
    if len(body) > MAX_PAYLOAD:
        raise SpecError(f"command and environment too long for a microVM exec "
                        f"({len(body)} bytes with framing, at most {MAX_PAYLOAD})")
    return body


class VMExecProcess(ExecProcess):
    """One command in the guest, driven through its ExecChannel."""

    def __init__(self, channel: "ExecChannel", sid: int, tty: bool = False) -> None:
        self._channel, self.sid, self.tty = channel, sid, tty
        self._send, self._recv = trio.open_memory_channel[LogChunk](math.inf)  # bounded by credit
        self.output = self._Output(self)
        self._unacked = 0
        self._consumed = 0  # output taken but not yet granted back to the guest
        self._window = trio.Condition()
        self._stdin_closed = False
        self.exit_code: int | None = None
        self.ended = trio.Event()

    class _Output:
        """Iterating takes output and grants the guest as much new credit."""

        def __init__(self, proc: "VMExecProcess") -> None:
            self._proc = proc

        def __aiter__(self):
            return self

        async def __anext__(self) -> LogChunk:
            proc = self._proc
            try:
                chunk = await proc._recv.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                raise StopAsyncIteration from None
            # Credit goes back in quarters of the window: fewer frames into the
            # guest (each costs it interrupts), and it never runs dry.
            proc._consumed += len(chunk.data)
            if proc._consumed >= OUTPUT_CREDIT // 4 and not proc.ended.is_set():
                grant, proc._consumed = proc._consumed, 0
                await proc._channel.send_frame(b"W", bytes([proc.sid]) + grant.to_bytes(4, "big"), quiet=True)
            return chunk

    async def send_stdin(self, data: bytes) -> None:
        if self._stdin_closed or self.ended.is_set():
            raise trio.ClosedResourceError("stdin is closed")
        view = memoryview(data)
        while view:
            async with self._window:
                while self._unacked >= STDIN_WINDOW and not self.ended.is_set():
                    await self._window.wait()
                if self.ended.is_set():
                    raise trio.BrokenResourceError("the command has ended")
                n = min(len(view), STDIN_WINDOW - self._unacked, MAX_PAYLOAD - 1)
                self._unacked += n
            await self._channel.send_frame(b"I", bytes([self.sid]) + bytes(view[:n]))
            view = view[n:]

    async def close_stdin(self) -> None:
        if self.tty:  # a terminal has no stdin to close: end of input is ^D
            if not self._stdin_closed and not self.ended.is_set():
                await self.send_stdin(b"\x04")
            self._stdin_closed = True
            return
        if not self._stdin_closed:
            self._stdin_closed = True
            if not self.ended.is_set():
                await self._channel.send_frame(b"C", bytes([self.sid]), quiet=True)

    async def resize(self, size: TerminalSize) -> None:
        if self.tty and not self.ended.is_set():
            await self._channel.send_frame(
                b"Z", bytes([self.sid]) + size.rows.to_bytes(2, "big") + size.cols.to_bytes(2, "big"),
                quiet=True)

    async def wait(self) -> int:
        await self.ended.wait()
        assert self.exit_code is not None
        return self.exit_code

    async def kill(self) -> None:
        if not self.ended.is_set():
            await self._channel.send_frame(b"K", bytes([self.sid]), quiet=True)

    # -- called by the channel's reader ----------------------------------------

    def _on_output(self, stream: str, data: bytes) -> None:
        self._send.send_nowait(LogChunk(stream, data))

    async def _on_ack(self, n: int) -> None:
        async with self._window:
            self._unacked = max(0, self._unacked - n)
            self._window.notify_all()

    async def _on_exit(self, code: int) -> None:
        if self.exit_code is None:
            self.exit_code = code
        self.ended.set()
        self._send.close()
        async with self._window:
            self._window.notify_all()


class ExecChannel:
    """The host end of one guest's exec channel (a QEMU chardev Unix socket)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stream: trio.SocketStream | None = None
        self._send_lock = trio.Lock()
        self._sessions: dict[int, VMExecProcess] = {}
        self._next_sid = 1
        self.ready = trio.Event()   # the guest answered the handshake
        self.closed = trio.Event()  # the VM is gone (or never spoke)
        self.unavailable_reason = "the microVM is not running"

    async def run(self, connect_timeout: float = 30.0, handshake_timeout: float = 120.0) -> None:
        """Connect, handshake, then dispatch guest frames until the VM goes away."""
        try:
            with trio.move_on_after(connect_timeout):
                while self._stream is None:
                    try:
                        self._stream = await trio.open_unix_socket(str(self.path))
                    except OSError:
                        await trio.sleep(0.05)
            if self._stream is None:
                self.unavailable_reason = "the microVM's exec channel never opened"
                return
            splitter = FrameSplitter()
            async with trio.open_nursery() as n:
                n.start_soon(self._handshake, handshake_timeout)
                try:
                    while data := await self._stream.receive_some(65536):
                        for item in splitter.feed(data):
                            if isinstance(item, tuple):
                                await self._dispatch(*item)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # QEMU went away (a reset when it dies with our data unread)
                n.cancel_scope.cancel()
        except Exception:  # exec is a side door: its failure must not end the task
            log.exception("microVM exec channel failed; exec into this VM is off")
            self.unavailable_reason = "the microVM's exec channel failed (see the provider's log)"
        finally:
            self.closed.set()
            for proc in list(self._sessions.values()):
                await proc._on_exit(KILLED_CODE)  # the VM ended under it
            self._sessions.clear()
            if self._stream is not None:
                with trio.CancelScope(shield=True):
                    await self._stream.aclose()

    async def _handshake(self, timeout: float) -> None:
        """'R' until the guest says 'H' (it drops what arrives before its init opens the port)."""
        with trio.move_on_after(timeout):
            while not self.ready.is_set():
                await self.send_frame(b"R", quiet=True)
                with trio.move_on_after(HANDSHAKE_RETRY_S):
                    await self.ready.wait()
            return
        self.unavailable_reason = "the guest does not answer on its exec channel (an older guest init?)"

    async def _dispatch(self, kind: bytes, payload: bytes) -> None:
        if kind == b"H":
            self.ready.set()
            return
        if not payload:
            return
        proc = self._sessions.get(payload[0])
        if proc is None:
            return
        body = payload[1:]
        if kind in (b"o", b"e"):
            proc._on_output("stdout" if kind == b"o" else "stderr", body)
        elif kind == b"a" and len(body) == 4:
            await proc._on_ack(int.from_bytes(body, "big"))
        elif kind == b"x":
            try:
                code = int(body)
            except ValueError:
                code = KILLED_CODE
            del self._sessions[payload[0]]
            await proc._on_exit(code)

    async def send_frame(self, kind: bytes, payload: bytes = b"", quiet: bool = False) -> None:
        """``quiet``: a closed channel is not an error (the session ends anyway)."""
        try:
            if self._stream is None or self.closed.is_set():
                raise trio.ClosedResourceError("exec channel closed")
            async with self._send_lock:
                await self._stream.send_all(encode_frame(kind, payload))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            if not quiet:
                raise trio.BrokenResourceError("the microVM's exec channel is closed") from None

    async def open(self, argv: list[str], env: dict[str, str], tty: TerminalSize | None = None,
                   timeout: float = 120.0) -> VMExecProcess:
        """Start ``argv`` in the guest (waiting for it to finish booting), on a
        new pseudo-terminal of the guest's when ``tty`` is given."""
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as n:
                async def until_closed() -> None:
                    await self.closed.wait()
                    n.cancel_scope.cancel()
                n.start_soon(until_closed)
                await self.ready.wait()
                n.cancel_scope.cancel()
        if not self.ready.is_set() or self.closed.is_set():
            raise ExecUnsupported(self.unavailable_reason if self.closed.is_set()
                                  else "the microVM did not finish booting in time")
        if len(self._sessions) >= MAX_SESSIONS:
            raise ExecUnsupported(f"a microVM runs at most {MAX_SESSIONS} exec sessions at once")
        sid = self._take_sid()
        payload = start_payload(sid, argv, env, tty)
        proc = VMExecProcess(self, sid, tty=tty is not None)
        self._sessions[sid] = proc
        try:
            await self.send_frame(b"S" if tty is None else b"T", payload)
            await self.send_frame(b"W", bytes([sid]) + OUTPUT_CREDIT.to_bytes(4, "big"))
        except trio.BrokenResourceError:
            self._sessions.pop(sid, None)
            raise ExecUnsupported(self.unavailable_reason) from None
        return proc

    def _take_sid(self) -> int:
        while self._next_sid in self._sessions:
            self._next_sid = self._next_sid % 255 + 1
        sid = self._next_sid
        self._next_sid = sid % 255 + 1
        return sid
