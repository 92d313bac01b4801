"""Start-up mistakes fail cleanly (real daemon processes): one line naming the
setting, a non-zero exit, nothing half-started (no api.json, no reaper left)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from daemons import ROOT, SYNORD


def _daemon(home: Path, *args: str, listen: str = "/ip4/127.0.0.1/tcp/0", api: str = "127.0.0.1:0",
            prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """Start a daemon that is expected to refuse to start; its result."""
    cmd = [*(prefix or []), *SYNORD, "--home", str(home), "daemon", "--listen", listen,
           "--api", api, "--no-mdns", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)


def _error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode != 0, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("synord: ")]
    assert len(lines) == 1, res.stderr
    return lines[0]


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and "pytest" not in cmdline:
            found.append(int(pid))
    return found


def _assert_nothing_left(home: Path) -> None:
    assert not (home / "api.json").exists()
    # the container reaper (synord.runtimes.reaper HOME/containers) went with the daemon
    assert _processes_mentioning(str(home / "containers")) == []


def test_second_daemon_on_a_home_and_a_busy_p2p_port(cluster):
    a = cluster.start("a")
    before = (a.home / "api.json").read_text()

    res = _daemon(a.home)  # the same home: refused by the lock, names the holder
    line = _error_line(res)
    assert f"another daemon runs on this home (pid {a.pid})" in line, line
    assert (a.home / "api.json").read_text() == before  # the first one's files untouched
    assert a.status()["peer_id"]

    # Another home on a's p2p port: py-libp2p would share it (SO_REUSEPORT); we refuse.
    port = next(addr.split("/tcp/")[1].split("/")[0] for addr in a.p2p_addrs() if "/127.0.0.1/" in addr)
    b = cluster.init_home("b")
    res = _daemon(b, listen=f"/ip4/127.0.0.1/tcp/{port}")
    assert _error_line(res) == f"synord: node.listen /ip4/127.0.0.1/tcp/{port}: address already in use"
    _assert_nothing_left(b)
    assert a.status()["peer_id"]

    a.kill()  # a crash leaves no lock behind (the kernel drops the flock with the process)
    assert cluster.start("a").status()["peer_id"]


@pytest.mark.parametrize("setting", ["api.listen", "metrics.listen"])
def test_busy_api_or_metrics_port(cluster, setting):
    home = cluster.init_home("c")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        if setting == "api.listen":
            res = _daemon(home, api=f"127.0.0.1:{port}")
        else:
            (home / "config.toml").write_text(f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
            res = _daemon(home)
    assert _error_line(res) == f"synord: {setting} 127.0.0.1:{port}: address already in use"
    _assert_nothing_left(home)
    # the lock went with it: the next start on this home is not refused for it
    assert "another daemon" not in _daemon(home, listen="/ip4/192.0.2.1/tcp/0").stderr


def test_listen_address_not_on_this_host(cluster):
    home = cluster.init_home("d")
    res = _daemon(home, listen="/ip4/192.0.2.1/tcp/0")  # TEST-NET-1: on no host
    assert _error_line(res) == "synord: node.listen /ip4/192.0.2.1/tcp/0: cannot assign requested address"
    _assert_nothing_left(home)


def test_unwritable_home(cluster):
    home = cluster.init_home("e")
    if os.geteuid() == 0:
        # root writes anywhere: make the home a read-only bind mount in a private mount namespace
        if not shutil.which("unshare") or subprocess.run(
                ["unshare", "-m", "true"], capture_output=True).returncode != 0:
            pytest.skip("needs unshare -m (mount namespaces) to make a read-only home as root")
        script = (f'mount --bind "{home}" "{home}" && mount -o remount,bind,ro "{home}" && exec "$@"')
        prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"]
    else:
        home.chmod(0o500)
        prefix = []
    try:
        res = _daemon(home, prefix=prefix)
    finally:
        home.chmod(0o700)
    line = _error_line(res)
    assert line.startswith(f"synord: home {home} (--home / SYNORD_HOME): not writable: "), line
    assert "read-only file system" in line or "permission denied" in line, line
    assert not (home / "api.json").exists()
