"""A socket born in another process's network namespace (`synord forward`).

A socket belongs to the namespace it was created in, whatever thread later
uses it: so a short-lived thread enters the sandbox's namespace with setns(2)
(Python 3.11 has no os.setns: libc through ctypes), creates one TCP socket and
ends.  The caller connects it to the sandbox's loopback from anywhere.  The
sandbox gets no interface, route or address of ours; the daemon's threads
never stay in a foreign namespace (the one that entered it is gone).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def socket_in_netns(pid: int) -> socket.socket:
    """A new (unconnected, blocking) TCP/IPv4 socket in the net namespace of ``pid``.
    OSError if that process is gone or we may not enter its namespace (EPERM
    without CAP_SYS_ADMIN)."""
    out: dict = {}

    def work() -> None:
        try:
            target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            out["error"] = OSError(errno.ESRCH, f"process {pid} is gone")
            return
        except OSError as exc:
            out["error"] = exc
            return
        try:
            _setns(target)
            out["sock"] = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            out["error"] = exc
        finally:
            os.close(target)
        # the thread ends here: its namespace goes with it

    t = threading.Thread(target=work, name="synord-netns", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["sock"]
