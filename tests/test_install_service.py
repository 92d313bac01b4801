"""packaging/install-service.sh, staged under a temporary --destdir (root needed, as in CI).

No systemd as PID 1 here (or, with it, --destdir): the script must install
everything and then say why it leaves systemd alone, exit 0. Dependencies come
from this venv (tests/wheel_helpers.py), so pip runs with --no-index.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from daemons import ROOT
from wheel_helpers import build_wheel, deps_dir, make_venv

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"),
                                reason="the install script creates a user: needs root and shadow's useradd")
SCRIPT = ROOT / "packaging" / "install-service.sh"


@pytest.fixture
def user():
    name = f"synord-i{secrets.token_hex(3)}"
    yield name
    subprocess.run(["userdel", name], check=False, capture_output=True)
    subprocess.run(["groupdel", name], check=False, capture_output=True)


def _install(destdir: Path, wheel: Path, user: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--wheel", str(wheel), "--destdir", str(destdir),
                           "--user", user, "--no-apt", "--pip-args", "--no-index"],
                          capture_output=True, text=True, timeout=300, cwd=destdir)


def _two_wheels(tmp: Path, version: str) -> tuple[Path, Path]:
    """This checkout's wheel, and the same source as a newer ``version`` (an upgrade)."""
    (tmp / "old").mkdir()
    old = build_wheel(tmp / "old")
    src = tmp / "old" / "src"  # the copy build_wheel made
    pyproject = src / "pyproject.toml"
    pyproject.write_text(re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', pyproject.read_text()))
    (tmp / "new").mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                    "-w", str(tmp / "new"), str(src)], check=True, capture_output=True, timeout=300)
    (new,) = (tmp / "new").glob(f"synord-{version}-*.whl")
    return old, new


@needs_root
def test_install_then_upgrade_without_systemd(tmp_path, user):
    old_wheel, new_wheel = _two_wheels(tmp_path, "0.1.999")
    destdir = tmp_path / "root"
    venv = destdir / "opt" / "synord" / "venv"
    make_venv(venv, deps_dir(tmp_path / "deps"))  # the dependencies, as if already downloaded

    res = _install(destdir, old_wheel, user)
    assert res.returncode == 0, res.stderr
    assert re.search(r"systemd is not running here|systemd left alone", res.stderr), res.stderr
    pw = pwd.getpwnam(user)

    unit = (destdir / "etc" / "systemd" / "system" / "synord.service").read_text()
    assert "ExecStart=/opt/synord/venv/bin/synord --home /var/lib/synord daemon" in unit
    assert f"\nUser={user}\n" in unit and f"\nGroup={user}\n" in unit
    assert (destdir / "usr" / "lib" / "sysusers.d" / f"{user}.conf").read_text().count(f" {user} ") >= 2
    doc = re.search(r"(?m)^Documentation=file://(/\S+)$", unit).group(1)
    assert (destdir / doc.lstrip("/")).is_file()

    state = destdir / "var" / "lib" / "synord"
    st = state.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (pw.pw_uid, pw.pw_gid, 0o750)
    assert stat.S_IMODE((state / "identity.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "api.token").stat().st_mode) == 0o640  # the group's CLI may use it
    identity = (state / "identity.key").read_bytes()

    # The installed package finds its guest kernel (not in a checkout: cwd is elsewhere).
    py = venv / "bin" / "python"
    guest = subprocess.run([str(py), "-c", "from synord.runtimes.microvm import MicroVMRuntime as M; "
                            "print(M().guest_dir)"], capture_output=True, text=True, cwd=tmp_path)
    assert guest.returncode == 0, guest.stderr
    assert Path(guest.stdout.strip()) == venv / "share" / "synord" / "guest"
    assert (venv / "share" / "synord" / "guest" / "vmlinux").is_file() or \
        not (ROOT / "packaging" / "guest" / "out" / "vmlinux").exists()

    # Re-running with a newer wheel upgrades in place; the identity stays.
    res = _install(destdir, new_wheel, user)
    assert res.returncode == 0, res.stderr
    version = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('synord'))"],
                             capture_output=True, text=True, cwd=tmp_path)
    assert version.stdout.strip() == "0.1.999"
    assert (state / "identity.key").read_bytes() == identity


def test_cli_finds_the_service_home(tmp_path):
    """Root (or the service's group) with no daemon of its own talks to the service's."""
    from daemons import SYNORD, DaemonCluster
    with DaemonCluster(tmp_path) as cluster:
        service = cluster.start("service")
        service.home.chmod(0o750)
        own = tmp_path / "user-home"
        own.mkdir()
        env = {"PATH": os.environ["PATH"], "HOME": str(own), "SYNORD_SERVICE_HOME": str(service.home)}
        res = subprocess.run([*SYNORD, "status", "--json"], capture_output=True, text=True, env=env,
                             cwd=ROOT, timeout=60)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["peer_id"] == service.status()["peer_id"]
        # A user's own running daemon wins over the service's.
        mine = cluster.start("mine")
        env["XDG_DATA_HOME"] = str(own)
        (own / "synord").symlink_to(mine.home)
        res = subprocess.run([*SYNORD, "status", "--json"], capture_output=True, text=True, env=env,
                             cwd=ROOT, timeout=60)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["peer_id"] == mine.status()["peer_id"]
