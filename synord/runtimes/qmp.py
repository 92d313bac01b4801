"""A small trio client for QEMU's QMP (JSON over a Unix socket).

Only what the microVM runtime needs: connect with a deadline, negotiate
capabilities, run commands one at a time; asynchronous events are kept in
``events``.  A dead QEMU raises `QMPError`, never hangs: every wait here sits
under the caller's deadline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio


class QMPError(Exception):
    pass


class QMP:
    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = b""
        self._lock = trio.Lock()
        self.events: list[dict] = []

    @classmethod
    async def connect(cls, path: Path, timeout: float = 30.0) -> "QMP":
        """Connect once QEMU has created its socket; then negotiate capabilities."""
        stream = None
        with trio.move_on_after(timeout):
            while stream is None:
                try:
                    stream = await trio.open_unix_socket(str(path))
                except (FileNotFoundError, ConnectionRefusedError):
                    await trio.sleep(0.01)
        if stream is None:
            raise QMPError(f"no QMP socket at {path} after {timeout:.0f} s")
        qmp = cls(stream)
        with trio.move_on_after(timeout) as cs:
            greeting = await qmp._read()
            if "QMP" not in greeting:
                raise QMPError(f"unexpected QMP greeting {greeting!r}")
            await qmp.execute("qmp_capabilities")
        if cs.cancelled_caught:
            await qmp.aclose()
            raise QMPError("QMP handshake timed out")
        return qmp

    async def _read(self) -> dict:
        while b"\n" not in self._buf:
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise QMPError(f"QMP connection lost: {e}") from None
            if not data:
                raise QMPError("QEMU closed the QMP connection")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    async def execute(self, command: str, arguments: dict | None = None) -> Any:
        async with self._lock:
            msg: dict = {"execute": command}
            if arguments:
                msg["arguments"] = arguments
            try:
                await self._stream.send_all(json.dumps(msg).encode() + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise QMPError(f"QMP connection lost: {e}") from None
            while True:
                reply = await self._read()
                if "event" in reply:
                    self.events.append(reply)
                    continue
                if "error" in reply:
                    err = reply["error"]
                    raise QMPError(f"{command}: {err.get('class')}: {err.get('desc')}")
                return reply.get("return")

    async def aclose(self) -> None:
        await self._stream.aclose()
