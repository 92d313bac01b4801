"""The dashboard in a real browser: Debian's chromium, headless, driven by
selenium through Debian's chromium-driver, against a real daemon.

Screenshots go to the test's tmp dir (dashboard-*.png).
"""

import http.client
import json
import os
import shutil
import time

import pytest

from daemons import wait_for
from synord.history import read, record
from synord.store import Store

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


def _get(url: str, path: str, headers: dict | None = None):
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp, body


def test_history_rows_are_kept_read_in_order_and_expire(tmp_path):
    store = Store(tmp_path / "state.db")
    base = 1_000_000.0
    for i in range(5):
        record(store, {"ts": base + 60 * i, "cpu_percent": 10.0 * i, "offered_cpus": 2.0, "tasks": i,
                       "contributing": 1, "earned": 0.5 * i, "spent": 0.0}, keep_s=150)
    rows = read(store)
    # 150 s kept behind the newest (base+240): base+120, base+180, base+240
    assert [r["ts"] - base for r in rows] == [120, 180, 240]
    assert [r["cpu_percent"] for r in rows] == [20.0, 30.0, 40.0]
    assert [r["ts"] - base for r in read(store, since=base + 180)] == [240]
    store.close()
    assert [r["tasks"] for r in read(Store(tmp_path / "state.db"))] == [2, 3, 4]  # on disk


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """One daemon for this module's single-node tests (the browser test, last, changes its state)."""
    from daemons import DaemonCluster
    with DaemonCluster(tmp_path_factory.mktemp("dashboard")) as cluster:
        cluster.init_home("a", config="[history]\ninterval_s = 1.0\n")
        yield cluster.start("a")


def test_dashboard_files_are_static_public_and_locked_down(node):
    d = node
    url = d.status()["api"]
    resp, page = _get(url, "/")
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/html")
    csp = resp.getheader("content-security-policy")
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "style-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert b'src="/app.js"' in page and b'href="/app.css"' in page and b"<script>" not in page
    for path, kind in (("/app.js", "text/javascript"), ("/app.css", "text/css"), ("/icon.svg", "image/svg+xml")):
        resp, body = _get(url, path)
        assert resp.status == 200 and resp.getheader("content-type").startswith(kind) and body
    assert _get(url, "/dashboard.js")[0].status == 401  # no such file: not public, not served
    assert _get(url, "/v1/history")[0].status == 401  # the data needs the token
    token = (d.home / "api.token").read_text().strip()
    resp, body = _get(url, "/v1/history?since=yesterday", {"Authorization": f"Bearer {token}"})
    assert resp.status == 400 and "since" in json.loads(body)["error"]
    assert _get(url, "/", {"Host": "evil.example"})[0].status == 421


def test_dashboard_open_hands_the_url_to_the_browser(node, tmp_path):
    import subprocess
    from daemons import ROOT, SYNORD
    d = node
    seen = tmp_path / "opened"
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\nprintf %s "$1" > {seen}\n')
    browser.chmod(0o755)
    res = subprocess.run([*SYNORD, "--home", str(d.home), "dashboard", "--open"], capture_output=True,
                         text=True, cwd=ROOT, timeout=30, env={**os.environ, "BROWSER": f"{browser} %s"})
    assert res.returncode == 0, res.stderr
    token = (d.home / "api.token").read_text().strip()
    url = wait_for(lambda: seen.exists() and seen.read_text(), what="the browser to be started")
    assert url == f"{d.status()['api']}/#token={token}" == res.stdout.strip()


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (quickstart.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,2000", f"--user-data-dir={tmp_path / 'chromium'}",
                "--no-first-run", "--disable-background-networking", "--disable-sync"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def test_dashboard_in_chromium_shows_state_pauses_and_edits_limits(node, browser, tmp_path):
    d = node
    peer_id = d.status()["peer_id"]
    wait_for(lambda: len(d.get("/v1/history")["samples"]) >= 2, what="two history samples")
    url = json.loads(d.cli("dashboard", "--json").stdout)["url"]
    assert url.startswith(d.status()["api"]) and "#token=" in url

    browser.get(url)
    wait_for(lambda: browser.execute_script("return document.body.dataset.loaded") == "1",
             what="the page to load its data")
    wait_for(lambda: _text(browser, "peer") == peer_id, what="peer id rendered")
    assert _text(browser, "state") == "Contributing"
    assert "#token" not in browser.current_url  # the token left the address bar
    # the stylesheet applied (a CSP that blocked it left the page unstyled)
    assert browser.execute_script(
        "return getComputedStyle(document.querySelector('header')).backgroundColor") == "rgb(255, 255, 255)"
    probe = d.get("/v1/probe")
    hardware = _text(browser, "hardware")
    assert probe["host"]["cpu_model"] in hardware and "CPUs" in hardware
    wait_for(lambda: "cpu" in _text(browser, "book"), what="our own ask's class in the book")
    assert "no receipts yet" in _text(browser, "receipts")
    # charts drawn from the daemon's history: one path per series
    paths = browser.find_elements("css selector", "#chart-util svg path")
    assert [p.get_attribute("data-series") for p in paths] == ["host CPU %", "tasks ×10"]
    assert paths[0].get_attribute("d").count("L") >= 1
    browser.save_screenshot(str(tmp_path / "dashboard-contributing.png"))

    browser.find_element("id", "pause").click()
    wait_for(lambda: _text(browser, "state") == "Paused", what="state Paused in the page")
    assert "paused by the owner" in _text(browser, "why")
    st = d.status()
    assert st["paused"] is True and st["contributing"] is False
    assert browser.find_element("id", "resume").is_displayed()
    assert not browser.find_element("id", "pause").is_displayed()
    browser.save_screenshot(str(tmp_path / "dashboard-paused.png"))
    browser.find_element("id", "resume").click()
    wait_for(lambda: _text(browser, "state") == "Contributing", what="state Contributing again")
    assert d.status()["paused"] is False

    # the limits editor: one field per key the API returns, typed
    keys = set(d.get("/v1/limits")["limits"])
    shown = {e.get_attribute("name") for e in browser.find_elements("css selector", "#limits input")}
    assert shown == keys
    assert browser.find_element("id", "limit-idle_only").get_attribute("type") == "checkbox"
    share = browser.find_element("id", "limit-cpu_share")
    assert share.get_attribute("type") == "number"
    share.clear()
    share.send_keys("0.5")
    # hours that exclude now: the page must say we are not contributing, and why
    hour = time.localtime().tm_hour
    hours = browser.find_element("id", "limit-allowed_hours")
    hours.clear()
    hours.send_keys(f"{(hour + 2) % 24:02d}-{(hour + 3) % 24:02d}")
    browser.find_element("id", "limits-apply").click()
    wait_for(lambda: "applied" in _text(browser, "limits-msg"), what="limits applied")
    lim = d.get("/v1/limits")
    assert lim["limits"]["cpu_share"] == 0.5 and lim["overrides"]["cpu_share"] == 0.5
    assert lim["allowed"] is False
    wait_for(lambda: _text(browser, "state") == "Not contributing", what="state Not contributing")
    assert "hour" in _text(browser, "why")
    st = d.status()
    assert st["contributing"] is False and "hour" in st["why_not"]
    browser.save_screenshot(str(tmp_path / "dashboard-limits.png"))

    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe  # no CSP violation, no failed request, no script error

    d.stop()  # the page says so when the daemon goes away
    wait_for(lambda: _text(browser, "state") == "Offline", what="state Offline")
    assert "cannot reach the daemon" in _text(browser, "err")


def test_dashboard_follows_a_running_task_and_shows_its_receipt(cluster, browser, tmp_path):
    from jobs_helpers import BUSYBOX_DIR, CONSUMER_ONLY, ensure_assets, start_mesh, submit, wait_job
    ensure_assets()
    consumer, (provider,) = start_mesh(cluster, 1, consumer_config=CONSUMER_ONLY + "[history]\ninterval_s = 1.0\n")
    browser.get(json.loads(consumer.cli("dashboard", "--json").stdout)["url"])
    wait_for(lambda: _text(browser, "state") == "Not contributing", what="the consumer's state")
    assert "contributor.enabled = false" in _text(browser, "why")
    # a task that prints, then waits for a file we create through `synord exec`: its output
    # must reach the page while it runs
    job_id = submit(consumer, "--runtime", "container", str(BUSYBOX_DIR), "--", "sh", "-c",
                    "i=0; while [ $i -lt 6 ]; do echo tick $i; i=$((i+1)); done; "
                    "while [ ! -e /tmp/go ]; do sleep 0.1; done; echo done")
    provider_short = provider.status()["peer_id"][-6:]
    # the row, once placed: the provider by its short unique id
    row = wait_for(lambda: (t := _text(browser, "jobs")) and "running" in t and provider_short in t and t,
                   what="the task running in the page")
    assert job_id in row and "container" in row
    browser.find_element("css selector", f'button.logs[data-job="{job_id}"]').click()
    wait_for(lambda: "tick 5" in _text(browser, "log"), what="live output")
    assert consumer.get(f"/v1/jobs/{job_id}")["state"] == "running"  # it waits for /tmp/go
    browser.save_screenshot(str(tmp_path / "dashboard-task.png"))
    consumer.cli("exec", job_id, "--", "touch", "/tmp/go")
    wait_for(lambda: "[exit 0]" in _text(browser, "log"), what="the task's end in the log")
    assert [ln for ln in _text(browser, "log").splitlines() if ln.startswith(("tick", "done"))] == \
        [f"tick {i}" for i in range(6)] + ["done"]
    wait_job(consumer, job_id)
    receipt = wait_for(lambda: consumer.get("/v1/ledger")["receipts"], what="the receipt")[0]
    wait_for(lambda: "consumer" in _text(browser, "receipts"), timeout=30, what="the receipt in the page")
    receipts = _text(browser, "receipts")
    assert "completed" in receipts and provider_short in receipts and "−" in receipts
    assert receipt["amount"] > 0
    browser.save_screenshot(str(tmp_path / "dashboard-receipt.png"))
