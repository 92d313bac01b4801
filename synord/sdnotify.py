"""systemd notify protocol (Type=notify): READY, STATUS, WATCHDOG, STOPPING.

A datagram to $NOTIFY_SOCKET ('@' prefix = abstract namespace). Pure Python,
no libsystemd. Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self.address = ("\0" + addr[1:]) if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        ok_pid = not pid or pid == str(os.getpid())
        self.watchdog_interval_s = int(usec) / 2e6 if usec.isdigit() and ok_pid else None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *fields: str) -> None:
        if not self.address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            try:
                s.sendto("\n".join(fields).encode(), self.address)
            except OSError:
                pass  # systemd gone or socket unreachable: nothing useful to do

    def ready(self, status: str = "") -> None:
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")


def scrub_environment() -> None:
    """Remove systemd's per-service variables so no child process inherits them.

    Called once the Notifier has read them: sandboxes and helpers must never
    be able to notify or watchdog on our behalf.
    """
    for key in list(os.environ):
        if key == "NOTIFY_SOCKET" or key.startswith(("WATCHDOG_", "LISTEN_")):
            del os.environ[key]
