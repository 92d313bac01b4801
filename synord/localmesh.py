"""A local mesh of real synord daemons as separate processes (demo, tests, benchmarks).

    with DaemonCluster(tmp_path) as cluster:
        a = cluster.start("a")
        b = cluster.start("b", bootstrap=a.p2p_addrs())
        b.get("/v1/peers")

Every daemon listens on loopback only, with mDNS off, unless started inside a network
namespace of the NAT testbed (``netns=``, tests/netlab.py). Teardown stops them
(SIGTERM, then SIGKILL after a deadline) and reaps them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout (cwd of the daemons)
SYNORD = [sys.executable, "-m", "synord.cli"]


class DaemonProcess:
    def __init__(self, home: Path, name: str, proc: subprocess.Popen, log_path: Path):
        self.home = home
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self._client = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 30.0) -> "DaemonProcess":
        api = self.home / "api.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon {self.name} exited with {self.proc.returncode}:\n"
                                   + self.log()[-4000:])
            if api.exists():
                try:
                    if json.loads(api.read_text()).get("pid") == self.proc.pid:
                        return self
                except ValueError:
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"daemon {self.name} not ready after {timeout}s:\n" + self.log()[-4000:])

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def client(self):
        from synord.client import ApiClient
        from synord.home import Home
        if self._client is None:
            self._client = ApiClient(Home(self.home))
        return self._client

    def get(self, path: str):
        return self.client.get(path)

    def post(self, path: str, body=None):
        return self.client.post(path, body)

    def status(self) -> dict:
        return self.get("/v1/status")

    def p2p_addrs(self) -> list[str]:
        return self.status()["addrs"]

    def cli(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        res = subprocess.run([*SYNORD, "--home", str(self.home), *args], capture_output=True,
                             text=True, timeout=timeout, cwd=ROOT)
        if check and res.returncode != 0:
            raise AssertionError(f"synord {' '.join(args)} failed ({res.returncode}): {res.stderr}")
        return res

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class DaemonCluster:
    def __init__(self, base: Path):
        self.base = Path(base)
        self.daemons: list[DaemonProcess] = []

    def init_home(self, name: str, config: str = "") -> Path:
        home = self.base / name
        res = subprocess.run([*SYNORD, "--home", str(home), "init"], capture_output=True,
                             text=True, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        if config:
            (home / "config.toml").write_text(config)
        return home

    def spawn(self, name: str, bootstrap: list[str] | None = None, config: str = "",
              extra_args: list[str] | None = None, env: dict | None = None,
              netns: str | None = None, listen: str = "/ip4/127.0.0.1/tcp/0",
              mdns: bool = False) -> DaemonProcess:
        """``netns``: run the daemon inside that network namespace (tests/netlab.py); its control
        API is then a unix socket in its home, which the client and CLI reach from anywhere."""
        home = self.base / name
        if not (home / "identity.key").exists():
            self.init_home(name, config)
        api = f"unix:{home / 'api.sock'}" if netns else "127.0.0.1:0"
        args = [*SYNORD, "--home", str(home), "daemon", "--listen", listen, "--api", api]
        if not mdns:
            args.append("--no-mdns")
        if netns:
            args = ["ip", "netns", "exec", netns, *args]  # ip execs: the pid stays the daemon's
        for b in bootstrap or []:
            args += ["--bootstrap", b]
        args += extra_args or []
        log_path = home / "daemon.log"
        penv = dict(os.environ)
        penv.update(env or {})
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=log, cwd=ROOT, env=penv,
                                    start_new_session=True)
        d = DaemonProcess(home, name, proc, log_path)
        self.daemons.append(d)
        return d

    def start(self, name: str, **kw) -> DaemonProcess:
        return self.spawn(name, **kw).wait_ready()

    def stop_all(self) -> None:
        for d in self.daemons:
            if d.proc.poll() is None:
                d.signal(signal.SIGCONT)
                d.signal(signal.SIGTERM)
        for d in self.daemons:
            d.stop()

    def __enter__(self) -> "DaemonCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the daemon may be mid-restart
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                         + (f" (last error: {last_exc})" if last_exc else ""))
