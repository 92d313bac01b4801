"""The wheel: one top-level import name (synord), its data inside, and it runs
from a fresh venv with the checkout out of reach (cwd elsewhere, no editable
install). Also the layering rule: synord.protocols, synord.runtimes and
synord.hwprobe import nothing else of synord."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from wheel_helpers import build_wheel, deps_dir, make_venv

LOW = ("synord.protocols", "synord.runtimes", "synord.hwprobe")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> Path:
    base = tmp_path_factory.mktemp("venv")
    py = make_venv(base / "venv", deps_dir(base / "deps"))
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--disable-pip-version-check", str(wheel)], check=True, capture_output=True, timeout=300)
    return base / "venv"


def test_wheel_installs_only_synord(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert z.read(top_level).decode().split() == ["synord"]
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"synord"}
    for data in ("synord/hwprobe/known_devices.json", "synord/runtimes/reaper.py"):  # (rename_packages.sh: under synord/)
        assert data in names


def test_installed_wheel_probes_and_runs_a_daemon(venv, tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    py, synord = venv / "bin" / "python", venv / "bin" / "synord"
    where = subprocess.run([str(py), "-c", "import synord, synord.runtimes.reaper as r; print(r.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv)
    generic = subprocess.run([str(py), "-c", "__import__('runtimes')"], capture_output=True, text=True,
                             cwd=tmp_path, env=env)
    assert "No module named 'runtimes'" in generic.stderr

    probe = subprocess.run([str(synord), "probe", "--json"], capture_output=True, text=True, cwd=tmp_path,
                           env=env, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert any(d["kind"] == "cpu" for d in json.loads(probe.stdout)["devices"])

    home = tmp_path / "home"
    subprocess.run([str(synord), "--home", str(home), "init"], check=True, capture_output=True, cwd=tmp_path,
                   env=env)
    log = open(tmp_path / "daemon.log", "wb")
    daemon = subprocess.Popen([str(synord), "--home", str(home), "daemon", "--api", "127.0.0.1:0",
                               "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"],
                              stdout=log, stderr=log, cwd=tmp_path, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (home / "api.json").exists():
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "daemon not ready"
            time.sleep(0.1)
        status = subprocess.run([str(synord), "--home", str(home), "status", "--json"], capture_output=True,
                                text=True, cwd=tmp_path, env=env, timeout=60)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["peer_id"]
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=60)
        log.close()
    assert code == 0, (tmp_path / "daemon.log").read_text()[-3000:]


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.lineno, f"synord.{a.name}" if node.module == "synord" else node.module)
                    for a in node.names]
    return out


def test_lower_layers_never_import_the_rest_of_synord():
    from synord import hwprobe
    from synord import protocols
    from synord import runtimes
    bad = [f"{f}:{line} imports {name}"
           for pkg in (protocols, runtimes, hwprobe)
           for f in Path(pkg.__file__).parent.rglob("*.py")
           for line, name in _imports(f)
           if (name == "synord" or name.startswith("synord.")) and not name.startswith(LOW)]
    assert not bad, "\n".join(bad)
