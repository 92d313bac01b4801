"""Build synord's wheel and give fresh venvs the test venv's dependencies, offline.

The wheel is built from a copy of the checkout (no build/ or *.egg-info left in
it) without build isolation, so it needs setuptools >= 77 in this venv (the
test extra) and no network. A fresh venv sees this venv's installed
dependencies through a .pth file naming a directory of links to them, which
leaves out synord's own editable install: only the wheel provides synord there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from daemons import ROOT

SKIP_COPY = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", "out", "cache"}


def build_wheel(dest: Path) -> Path:
    src = dest / "src"
    shutil.copytree(ROOT, src, ignore=lambda d, names: [
        n for n in names if n in SKIP_COPY or n.endswith(".egg-info")
        or (Path(d) / n) == ROOT / "tests" / "assets" / "build"])
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                          "--disable-pip-version-check", "-w", str(dest), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (wheel,) = dest.glob("synord-*.whl")
    return wheel


def deps_dir(dest: Path) -> Path:
    """Links to every installed distribution this Python sees (its site-packages and
    what .pth files add) but synord itself."""
    dest.mkdir(parents=True, exist_ok=True)
    sites = [Path(sysconfig.get_paths()["purelib"])] + [Path(p) for p in sys.path if p]
    for site in sites:
        if not site.is_dir() or not any(e.name.endswith(".dist-info") for e in site.iterdir()):
            continue
        for entry in site.iterdir():
            name = entry.name.lower()
            if name.startswith(("synord", "__editable__", "_synord")) or name.endswith(".pth") \
                    or (dest / entry.name).exists():
                continue
            (dest / entry.name).symlink_to(entry.resolve())
    return dest


def make_venv(path: Path, deps: Path) -> Path:
    """A fresh venv (no pip download needed) that imports dependencies from ``deps``."""
    venv.EnvBuilder(with_pip=False).create(path)
    py = path / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "synord-test-deps.pth").write_text(f"{deps}\n")
    return py
