"""A command beside a running container task (``<runtime> exec``): its output
on host pipes or on a pseudo-terminal the runtime hands over its console socket.

The interface (`ExecProcess`, `TerminalSize`) is in `synord.runtimes.base`; this is
the host-process plumbing behind it, used by the container sandbox.
"""

from __future__ import annotations

import os

import trio

from .base import ExecProcess, ExecUnsupported, LogChunk, TerminalSize


class PipeExecProcess(ExecProcess):
    """A command on host pipes (``<runtime> exec``); ``run_output`` pumps them."""

    def __init__(self, proc: trio.Process):
        self.proc = proc
        self._send, self.output = trio.open_memory_channel[LogChunk](64)
        self._stdin_closed = proc.stdin is None

    async def run_output(self) -> None:
        await pump_exec_output(self.proc, self._send)

    async def send_stdin(self, data: bytes) -> None:
        if self._stdin_closed:
            raise trio.ClosedResourceError("stdin is closed")
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(data)

    async def close_stdin(self) -> None:
        if not self._stdin_closed and self.proc.stdin is not None:
            self._stdin_closed = True
            await self.proc.stdin.aclose()

    async def wait(self) -> int:
        return await self.proc.wait()

    async def aclose(self) -> None:
        self.output.close()


def set_terminal_size(fd: int, size: TerminalSize) -> None:
    import fcntl
    import struct
    import termios
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.rows, size.cols, 0, 0))


class PtyExecProcess(ExecProcess):
    """A command on a host pseudo-terminal (``<runtime> exec`` with a console
    socket): ``run_output`` pumps the master into ``output`` until the last
    user of the terminal is gone."""

    def __init__(self, proc: trio.Process, master_fd: int):
        self.proc = proc
        self._master = trio.lowlevel.FdStream(master_fd)
        self._send, self.output = trio.open_memory_channel[LogChunk](64)
        self._eof_sent = False

    async def run_output(self) -> None:
        async with self._send:
            try:
                while data := await self._master.receive_some(65536):
                    await self._send.send(LogChunk("stdout", data))
            except (OSError, trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # EIO: nobody holds the terminal any more

    async def send_stdin(self, data: bytes) -> None:
        await self._master.send_all(data)

    async def close_stdin(self) -> None:
        if not self._eof_sent:  # a terminal has no stdin to close: end of input is ^D
            self._eof_sent = True
            await self._master.send_all(b"\x04")

    async def resize(self, size: TerminalSize) -> None:
        set_terminal_size(self._master.fileno(), size)

    async def wait(self) -> int:
        return await self.proc.wait()

    async def aclose(self) -> None:
        self.output.close()
        await self._master.aclose()


async def receive_console_master(listener, proc: trio.Process, what: str) -> int:
    """The pty master a runtime sends to its ``--console-socket`` (SCM_RIGHTS);
    ExecUnsupported with the runtime's own words if it exits first."""
    import array
    import socket
    master = -1

    async def receive(cancel: trio.CancelScope) -> None:
        nonlocal master
        conn, _ = await listener.accept()
        with conn:
            _, ancdata, _, _ = await conn.recvmsg(4096, socket.CMSG_SPACE(4 * array.array("i").itemsize))
        fds = array.array("i")
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        if fds:
            master = fds[0]
            for extra in fds[1:]:
                os.close(extra)
        cancel.cancel()

    async def runtime_exits(cancel: trio.CancelScope) -> None:
        await proc.wait()
        await trio.sleep(0.2)  # it may have sent the terminal just before exiting
        cancel.cancel()

    with trio.move_on_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(receive, n.cancel_scope)
            n.start_soon(runtime_exits, n.cancel_scope)
    if master < 0:
        err = b""
        if proc.stderr is not None:
            with trio.move_on_after(1):
                err = await proc.stderr.receive_some(4096)
        detail = err.decode(errors="replace").strip().splitlines()
        raise ExecUnsupported(f"{what} gave no terminal" + (f": {detail[-1]}" if detail else ""))
    return master


async def pump_exec_output(proc: trio.Process, send: "trio.MemorySendChannel[LogChunk]") -> None:
    """Feed a process's stdout and stderr, as they come, into ``send``; close it at EOF of both."""
    async def pump(stream, name: str, ch) -> None:
        async with ch:
            try:
                while data := await stream.receive_some(65536):
                    await ch.send(LogChunk(name, data))
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass

    async with send, trio.open_nursery() as n:
        n.start_soon(pump, proc.stdout, "stdout", send.clone())
        n.start_soon(pump, proc.stderr, "stderr", send.clone())
