"""Child processes that die with the daemon, even when the daemon is SIGKILLed.

``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, not
the process.  trio forks from a worker thread of its cache, and that thread
exits after 10 s idle: the signal would kill a healthy VM.  So the fork
happens in a thread of our own that stays alive exactly as long as the child
(it blocks in ``waitid(WNOWAIT)``, which does not reap).  Then the death
signal fires only when the whole daemon dies.

Exit is observed with a pidfd (readable when the child is a zombie, so its
CPU time can still be read) and reaped with ``Popen.wait``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess

import trio

_LIMITER: trio.lowlevel.RunVar = trio.lowlevel.RunVar("synord_anchor_limiter")
PR_SET_PDEATHSIG = 1


def _limiter() -> trio.CapacityLimiter:
    # one parked thread per live child; trio's default limiter (40) is for short calls
    try:
        return _LIMITER.get()
    except LookupError:
        lim = trio.CapacityLimiter(4096)
        _LIMITER.set(lim)
        return lim


def _pdeathsig(sig: int = signal.SIGKILL) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, sig)


class AnchoredProcess:
    def __init__(self, popen: subprocess.Popen, stdout_fd: int, stderr_fd: int) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.stdout = trio.lowlevel.FdStream(stdout_fd)
        self.stderr = trio.lowlevel.FdStream(stderr_fd)
        self._pidfd = os.pidfd_open(popen.pid)
        self.owned_fds: list[int] = []  # closed by aclose (e.g. the reaper's lifeline)

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    async def wait_exited(self) -> None:
        """Return once the child has exited; it stays a zombie (CPU time readable) until wait()."""
        if self._pidfd >= 0 and self.popen.returncode is None:
            await trio.lowlevel.wait_readable(self._pidfd)

    async def wait(self) -> int:
        await self.wait_exited()
        # the child is a zombie now: reaping it cannot block
        code = self.popen.wait()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        return code

    def kill_group(self) -> None:
        """SIGKILL the child's process group (it leads its own session)."""
        if self.popen.returncode is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def aclose(self) -> None:
        for s in (self.stdout, self.stderr):
            await s.aclose()
        while self.owned_fds:
            os.close(self.owned_fds.pop())


async def spawn(nursery: trio.Nursery, argv: list[str], *, env: dict[str, str],
                cwd: str | None = None, death_signal: int = signal.SIGKILL,
                stdin: int | None = None) -> AnchoredProcess:
    """Start ``argv`` in a new session, stdin /dev/null (or the fd ``stdin``), stdout/stderr
    piped to trio streams; it gets ``death_signal`` when the daemon dies (0: none).

    The anchor thread lives in ``nursery`` until the child exits: the caller must
    make sure the child is killed when it stops caring (cancellation included)."""
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    started = trio.Event()
    result: dict = {}
    token = trio.lowlevel.current_trio_token()

    def anchor() -> None:
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL if stdin is None else stdin, stdout=out_w, stderr=err_w,
                                 env=env, cwd=cwd, start_new_session=True,
                                 preexec_fn=lambda: _pdeathsig(death_signal))
        except BaseException as e:  # reported to the trio side, which raises it
            result["error"] = e
            trio.from_thread.run_sync(started.set, trio_token=token)
            return
        result["popen"] = p
        trio.from_thread.run_sync(started.set, trio_token=token)
        try:
            os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            pass  # already reaped by wait()

    async def run_anchor() -> None:
        # shielded: the thread must start even in a cancelled nursery, or `started`
        # never fires; it ends when the child exits, and owners kill the child on cancel
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(anchor, limiter=_limiter())

    nursery.start_soon(run_anchor)
    try:
        with trio.CancelScope(shield=True):  # the fork is quick; never lose track of a child
            await started.wait()
    finally:
        os.close(out_w)
        os.close(err_w)
    if "error" in result:
        os.close(out_r)
        os.close(err_r)
        raise result["error"]
    return AnchoredProcess(result["popen"], out_r, err_r)
