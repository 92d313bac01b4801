"""`synord demo` end to end: real daemons, real sandboxes, receipts, clean-up."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def _run_demo(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the demo's temp dir lands under tmp_path
    # From an unrelated cwd: the demo must not depend on the checkout's test assets.
    return subprocess.run([sys.executable, "-m", "synord.cli", "demo", *extra], capture_output=True,
                          text=True, timeout=400, cwd=tmp_path, env=env)


@pytest.mark.slow
def test_demo_places_all_three_kinds_with_receipts(tmp_path):
    res = _run_demo(tmp_path)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    for header in ("== Mesh", "== Order book", "== Task 1/3: wasm", "== Task 2/3: container",
                   "== Task 3/3: microvm", "== Receipts", "== Summary"):
        assert header in out, header
    # The book shows both providers' asks with their prices.
    assert len(re.findall(r"ask from provider\d +price \d", out)) == 2
    # Each task: placed on a provider at a price, ran its real payload, exit 0.
    assert len(re.findall(r"placed on provider\d .*agreement [0-9a-f]{16}.*price \d", out)) == 3
    assert "sum of squares 1..1000 = 333833500" in out
    assert "hello from a container task" in out and "hello from a microVM task" in out
    assert out.count("exit code 0, job ") == 3
    # Receipts: both signatures, the same in the consumer's and the provider's ledger.
    assert len(re.findall(r"provider_sig [0-9a-f]{24}….*consumer_sig [0-9a-f]{24}….*"
                          r"\(identical in both ledgers\)", out)) == 3
    for kind in ("wasm", "container", "microvm"):
        assert re.search(rf"^  {kind} +SUCCEEDED .*both signatures present", out, re.M), kind
    assert "all tasks succeeded" in out
    # Cleaned up: no demo home left behind.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("synord-demo-")]


@pytest.mark.slow
def test_demo_keep_leaves_the_homes(tmp_path):
    res = _run_demo(tmp_path, "--keep")
    assert res.returncode == 0, res.stdout + res.stderr
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("synord-demo-")]
    assert len(kept) == 1
    for name in ("consumer", "provider1", "provider2"):
        assert (kept[0] / name / "daemon.log").exists()
