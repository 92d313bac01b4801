"""Foundation: identity, config, store durability, control API auth, lifecycle, sd_notify."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from daemons import ROOT, SYNORD

from synord.protocols.identity import Identity, peer_id_from_public_key, public_key_from_peer_id, verify


def synord(*args, home=None, **kw):
    cmd = [*SYNORD] + (["--home", str(home)] if home else []) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60, **kw)


# ---- identity -------------------------------------------------------------------

def test_init_is_idempotent_and_key_is_private(tmp_path):
    first = json.loads(synord("init", "--json", home=tmp_path).stdout)
    second = json.loads(synord("init", "--json", home=tmp_path).stdout)
    assert first["created"] is True and second["created"] is False
    assert first["peer_id"] == second["peer_id"] and first["peer_id"].startswith("12D3KooW")
    assert stat.S_IMODE((tmp_path / "identity.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "api.token").stat().st_mode) == 0o600
    assert "[node]" in (tmp_path / "config.toml").read_text()


def test_peer_id_is_the_libp2p_peer_id_of_the_key():
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID
    ident = Identity.generate()
    kp = create_new_key_pair(ident.seed)
    assert ident.peer_id == ID.from_pubkey(kp.public_key).to_base58()
    assert public_key_from_peer_id(ident.peer_id) == ident.public_key
    sig = ident.sign(b"hello")
    assert verify(ident.peer_id, b"hello", sig)
    assert not verify(ident.peer_id, b"hellO", sig)
    assert not verify(peer_id_from_public_key(Identity.generate().public_key), b"hello", sig)


def test_world_readable_key_is_refused(tmp_path):
    synord("init", home=tmp_path)
    os.chmod(tmp_path / "identity.key", 0o644)
    res = synord("daemon", "--api", "127.0.0.1:0", "--no-mdns", home=tmp_path)
    assert res.returncode != 0
    assert "readable by others" in res.stderr


# ---- CLI -------------------------------------------------------------------------

def test_unknown_command_and_bad_flag_give_one_line_errors(tmp_path):
    for args in (["frobnicate"], ["status", "--bogus"]):
        res = synord(*args, home=tmp_path)
        assert res.returncode == 2
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert res.stderr.startswith("synord")


def test_status_without_daemon_says_so(tmp_path):
    synord("init", home=tmp_path)
    res = synord("status", "--json", home=tmp_path)
    assert res.returncode == 1 and res.stdout == ""
    assert "not running" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_cli_does_not_import_the_network_stack():
    code = ("import sys, synord.cli, synord.client, synord.config; "
            "heavy = [m for m in ('libp2p', 'trio', 'starlette', 'hypercorn', 'wasmtime', 'numpy') "
            "if m in sys.modules]; print(heavy)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr


# ---- config ----------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("[node]\nlisten = 5\n", "node.listen: expected list[str]"),
    ("[node]\nlistn = []\n", "node.listn: unknown key"),
    ("[nodes]\n", "[nodes]: unknown section"),
    ("[contributor]\ncpu_share = 1.5\n", "contributor.cpu_share: must be between 0 and 1"),
    ("[contributor]\nweekday_hours = \"someday 10-12\"\n", "contributor.weekday_hours: is not valid: unknown day"),
    ("[api]\nlisten = \"0.0.0.0:7070\"\n", "api.listen: the control API listens on loopback only"),
    ("[node\n", "invalid TOML"),
    ("[market]\nspend_cap = -1.0\n", "market.spend_cap: must be a positive finite number"),
    ("[market]\nmax_price = inf\n", "market.max_price: must be a finite number"),
    ("[market]\nmax_price = 0\n", "market.max_price: must be a positive finite number"),
    ("[relay]\nhop = \"yes\"\n", "relay.hop: must be auto, on or off, not 'yes'"),
    ("[relay]\nmax_circuits = 0\n", "relay.max_circuits: must be a positive number"),
])
def test_invalid_config_is_refused_with_file_key_and_reason(tmp_path, text, expected):
    synord("init", home=tmp_path)
    (tmp_path / "config.toml").write_text(text)
    res = synord("daemon", "--api", "127.0.0.1:0", "--no-mdns", home=tmp_path)
    assert res.returncode == 1
    assert str(tmp_path / "config.toml") in res.stderr
    assert expected in res.stderr
    assert "Traceback" not in res.stderr


def test_flags_override_config(tmp_path):
    from synord.config import load
    from synord.daemon import DaemonOptions
    (tmp_path / "c.toml").write_text('[api]\nlisten = "127.0.0.1:9999"\n[node]\nmdns = true\n')
    cfg = load(tmp_path / "c.toml")
    DaemonOptions(api="127.0.0.1:0", mdns=False).apply(cfg)
    assert cfg["api.listen"] == "127.0.0.1:0" and cfg["node.mdns"] is False


# ---- store -----------------------------------------------------------------------

def test_store_migrates_and_reopens(tmp_path):
    from synord.store import MIGRATIONS, Store
    s = Store(tmp_path / "db")
    s.kv_set("answer", {"x": 42})
    s.close()
    s = Store(tmp_path / "db")
    assert s.kv_get("answer") == {"x": 42}
    assert s.conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_acknowledged_state_survives_kill_9(cluster):
    d = cluster.start("n1")
    assert d.post("/v1/pause")["paused"] is True  # acknowledged = committed
    d.kill()  # SIGKILL: no shutdown code runs
    assert d.proc.returncode == -signal.SIGKILL
    d2 = cluster.start("n1")
    st = d2.status()
    assert st["paused"] is True and st["contributing"] is False


# ---- control API -----------------------------------------------------------------

def _raw(url: str, path: str, headers: dict) -> tuple[int, dict]:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    body = json.loads(resp.read() or b"null")
    conn.close()
    return resp.status, body


def test_api_requires_token_and_loopback_host(cluster):
    d = cluster.start("n1")
    info = json.loads((d.home / "api.json").read_text())
    assert info["pid"] == d.pid and info["url"].startswith("http://127.0.0.1:")
    assert stat.S_IMODE((d.home / "api.token").stat().st_mode) == 0o600
    token = (d.home / "api.token").read_text().strip()
    url = info["url"]
    assert _raw(url, "/v1/status", {})[0] == 401
    assert _raw(url, "/v1/status", {"Authorization": "Bearer wrong"})[0] == 401
    assert _raw(url, "/v1/status", {"Authorization": f"Bearer {token}",
                                    "Host": "evil.example:80"})[0] == 421
    code, body = _raw(url, "/v1/status", {"Authorization": f"Bearer {token}"})
    assert code == 200 and body["peer_id"] == d.status()["peer_id"]
    assert _raw(url, "/metrics", {})[0] == 401
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
    text = conn.getresponse().read().decode()
    assert "synord_peers 0.0" in text and "synord_contributing 1.0" in text


def test_status_json_contract(cluster):
    d = cluster.start("n1")
    res = d.cli("status", "--json")
    st = json.loads(res.stdout)
    for key in ("peer_id", "addrs", "version", "uptime_s", "peers", "contributing"):
        assert key in st
    assert all(a.endswith("/p2p/" + st["peer_id"]) for a in st["addrs"])


def test_api_on_unix_socket(cluster, tmp_path):
    sock = tmp_path / "api.sock"
    d = cluster.spawn("n1", extra_args=["--api", f"unix:{sock}"]).wait_ready()
    assert json.loads((d.home / "api.json").read_text())["url"] == f"unix:{sock}"
    assert d.cli("status", "--json").returncode == 0


# ---- lifecycle -------------------------------------------------------------------

def test_sigterm_stops_gracefully(cluster):
    d = cluster.start("n1")
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.proc.wait(10) == 0
    assert time.monotonic() - t0 < 5.0, "idle daemon must stop within 5 s"
    assert not (d.home / "api.json").exists()
    assert "stopped" in d.log()


def test_sd_notify_ready_watchdog_stopping(cluster, tmp_path):
    path = tmp_path / "notify.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(path))
    srv.settimeout(30)
    try:
        d = cluster.spawn("n1", env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
        got: list[str] = []

        def until(field):
            while not any(field in m for m in got):
                got.append(srv.recv(4096).decode())
            return True
        until("READY=1")
        until("WATCHDOG=1")
        d.signal(signal.SIGTERM)
        until("STOPPING=1")
        assert d.proc.wait(10) == 0
    finally:
        srv.close()


def test_children_do_not_inherit_notify_socket(monkeypatch):
    from synord.sdnotify import Notifier, scrub_environment
    monkeypatch.setenv("NOTIFY_SOCKET", "@synord-test")
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("LISTEN_FDS", "1")
    n = Notifier()
    assert n.enabled and n.address == "\0synord-test" and n.watchdog_interval_s == 0.5
    scrub_environment()
    out = subprocess.run(["env"], capture_output=True, text=True).stdout
    assert "NOTIFY_SOCKET" not in out and "WATCHDOG_USEC" not in out and "LISTEN_FDS" not in out


# ---- probe and local sandboxes from the CLI ---------------------------------------

def test_probe_json_without_a_daemon(tmp_path):
    res = synord("probe", "--json", home=tmp_path)
    assert res.returncode == 0, res.stderr
    prof = json.loads(res.stdout)
    assert any(d["kind"] == "cpu" for d in prof["devices"])
    assert any(d["kind"] == "opencl" for d in prof["devices"])  # PoCL here
    assert set(prof["runtimes"]) == {"wasm", "container", "microvm"}
    assert all(set(r) >= {"available", "reason"} for r in prof["runtimes"].values())


def test_sandbox_run_locally(tmp_path):
    wasm = ROOT / "tests" / "assets" / "build" / "wasm" / "probe.wasm"
    if not wasm.exists():
        subprocess.run(["bash", str(ROOT / "tests" / "assets" / "build.sh")], check=True)
    res = synord("sandbox", "run", str(wasm), "--", "hello", home=tmp_path)
    assert (res.returncode, res.stdout) == (0, "hello, wasm\n")
    res = synord("sandbox", "run", "--json", str(wasm), "--", "exit", "3", home=tmp_path)
    assert res.returncode == 3 and json.loads(res.stdout.splitlines()[-1])["code"] == 3
    res = synord("sandbox", "run", str(tmp_path / "nope.wasm"), home=tmp_path)
    assert res.returncode == 1 and "does not exist" in res.stderr


def test_followed_streams_have_no_socket_timeout(tmp_path):
    """`synord run` / `logs -f` may wait minutes for the next line: no 30 s socket timeout."""
    from synord.client import ApiClient
    from synord.home import Home
    (tmp_path / "api.json").write_text('{"url": "http://127.0.0.1:9", "pid": 1}')
    (tmp_path / "api.token").write_text("t\n")
    client = ApiClient(Home(tmp_path))
    assert client._connection(None).timeout is None
    assert client._connection().timeout == client.timeout == 30.0
