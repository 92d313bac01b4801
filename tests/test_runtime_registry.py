"""The runtime registry (synord/runtimes/__init__.py): one list of kinds, one answer to
"which sandboxes work here", shared by `synord probe` and the daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from synord.protocols import orders, tasks
from synord.protocols.kinds import RUNTIME_KINDS
from synord.runtimes import KINDS, available_all, get_runtime
from synord.runtimes.base import SpecError

REPO = Path(__file__).resolve().parents[1]


def test_every_wire_kind_has_its_runtime_and_the_list_is_one():
    assert KINDS is RUNTIME_KINDS is orders.RUNTIMES and tasks.RUNTIME_KINDS is RUNTIME_KINDS
    for kind in KINDS:
        assert get_runtime(kind).kind == kind
    with pytest.raises(SpecError, match="unknown runtime 'gpu-magic'"):
        get_runtime("gpu-magic")


def test_available_all_reports_every_kind_with_a_reason():
    report = available_all()
    assert list(report) == list(KINDS)
    for kind, av in report.items():
        # and for microVMs whether a GPU could be passed through (runtimes.vfio), and why not
        extra = {"gpu"} if kind == "microvm" else set()
        assert set(av) == {"available", "reason"} | extra and isinstance(av["available"], bool), kind
        assert av["available"] == get_runtime(kind).available().available
        if not av["available"]:
            assert av["reason"], kind  # never "no" without saying why


def test_a_kind_not_enabled_is_reported_off_without_probing_it():
    report = available_all(enabled=["wasm"])
    assert report["container"] == report["microvm"] == {"available": False, "reason": "disabled in config"}
    assert report["wasm"] == get_runtime("wasm").available().to_json()


def test_a_missing_wasmtime_is_a_reason_not_a_crash(tmp_path):
    # A machine whose wasmtime cannot load: a module of that name that fails to import.
    (tmp_path / "wasmtime.py").write_text("raise ImportError('libwasmtime.so: cannot open shared object file')\n")
    code = "import json; from synord import runtimes; print(json.dumps(runtimes.available_all()['wasm']))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                         env={"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    wasm = json.loads(out.stdout)
    assert wasm["available"] is False and "libwasmtime.so" in wasm["reason"]


def test_synord_probe_without_a_daemon_reports_what_the_registry_does(tmp_path):
    out = subprocess.run([sys.executable, "-m", "synord.cli", "--home", str(tmp_path / "home"), "probe", "--json"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["runtimes"] == available_all()
