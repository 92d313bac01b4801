"""`synord tray` on a real X server: Xvfb, trayer as the XEmbed system tray,
xdotool as the user's mouse, against real daemons; and over D-Bus, the
StatusNotifierItem path a desktop panel takes (tests/sni_host.py plays the panel).

Screenshots (the tray's icon in each state, and its menu) go to the test's tmp dir.
"""

import os
import re
import shutil
import subprocess

import pytest

from daemons import ROOT, SYNORD, wait_for
from synord.tray import SYSTEM_PYTHON, describe

TOOLS = {name: shutil.which(name) for name in ("Xvfb", "trayer", "xdotool", "xwininfo", "import")}

# the icons' background colours (synord/icons/synord-*.svg)
COLOURS = {"contributing": (0x2f, 0x7d, 0x5b), "working": (0x09, 0x69, 0xda), "paused": (0xbf, 0x87, 0x00),
           "offline": (0x6e, 0x77, 0x81)}


def test_describe_maps_status_to_icon_and_words():
    assert describe(None, "the daemon is not running for home /x").icon == "synord-offline"
    assert describe(None, "did not answer in time").label == "Offline: the daemon does not answer"
    paused = describe({"paused": True, "contributing": False, "why_not": "paused by the owner"})
    assert (paused.icon, paused.can_pause, paused.can_resume) == ("synord-paused", False, True)
    limited = describe({"paused": False, "contributing": False, "why_not": "outside allowed hours 01-02"})
    assert limited.label == "Not contributing: outside allowed hours 01-02" and limited.can_pause
    assert describe({"contributing": True, "running_tasks": 2}).label == "Working: 2 tasks"
    assert describe({"contributing": True, "running_tasks": 0}).icon == "synord-contributing"


def _gtk_missing() -> str | None:
    missing = [name for name, path in TOOLS.items() if not path]
    if missing:
        return f"needs {', '.join(missing)} (quickstart.sh installs xvfb, trayer, xdotool, x11-utils, imagemagick)"
    probe = ("import gi; gi.require_version('Gtk', '3.0'); gi.require_version('AyatanaAppIndicator3', '0.1'); "
             "from gi.repository import Gtk, AyatanaAppIndicator3")
    if subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True).returncode != 0:
        return "needs python3-gi, gir1.2-gtk-3.0 and gir1.2-ayatanaappindicator3-0.1"
    return None


class Desktop:
    """An X server with a system tray, and helpers to look at it and click on it."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.procs: list[subprocess.Popen] = []
        read, write = os.pipe()
        self.xvfb = self._spawn(["Xvfb", "-displayfd", str(write), "-screen", "0", "800x600x24",
                                 "-nolisten", "tcp"], pass_fds=(write,))
        os.close(write)
        with os.fdopen(read) as f:
            self.env = {**os.environ, "DISPLAY": ":" + f.readline().strip(),
                        "DBUS_SESSION_BUS_ADDRESS": "disabled:"}  # no StatusNotifier host: XEmbed
        self._spawn(["trayer", "--edge", "top", "--align", "right", "--widthtype", "request",
                     "--height", "32", "--SetDockType", "false", "--transparent", "false"])

    def _spawn(self, argv, **kw) -> subprocess.Popen:
        log = open(self.tmp / f"{os.path.basename(argv[0])}.log", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=getattr(self, "env", None), **kw)
        self.procs.append(proc)
        return proc

    def windows(self) -> list[tuple[str, int, int, int, int]]:
        """(name, width, height, x, y) of the root's mapped-or-not children."""
        out = subprocess.run(["xwininfo", "-root", "-children"], capture_output=True, text=True,
                             env=self.env, check=True).stdout
        return [(m[1], int(m[2]), int(m[3]), int(m[4]), int(m[5]))
                for m in re.finditer(r'0x[0-9a-f]+ "([^"]*)".*?\s(\d+)x(\d+)\+(-?\d+)\+(-?\d+)', out)]

    def panel(self) -> tuple[int, int, int, int]:
        """The tray's rectangle (x, y, w, h) once it holds an icon."""
        def found():
            for name, w, h, x, y in self.windows():
                if name == "panel" and w > 20:  # trayer grows from its empty width to fit the icon
                    return x, y, w, h
        return wait_for(found, what="an icon in the tray")

    def screenshot(self, name: str, box: tuple[int, int, int, int] | None = None):
        from PIL import Image
        path = self.tmp / f"{name}.png"
        subprocess.run(["import", "-window", "root", str(path)], env=self.env, check=True)
        img = Image.open(path).convert("RGB")
        if box:  # clipped to the screen (a menu may reach past its edge)
            x, y, w, h = box
            img = img.crop((max(0, x), max(0, y), min(img.width, x + w), min(img.height, y + h)))
            img.save(path)
        return img

    def share(self, img, colour) -> float:
        """Share of the pixels within a few steps of ``colour``."""
        px = img.load()
        near = sum(1 for x in range(img.width) for y in range(img.height)
                   if all(abs(a - b) <= 24 for a, b in zip(px[x, y], colour)))
        return near / (img.width * img.height)

    def menu_items(self, img) -> list[int]:
        """The y centres of a menu's sensitive items: rows with dark (not greyed-out) text."""
        px = img.load()
        dark = [any(sum(px[x, y]) < 3 * 90 for x in range(img.width)) for y in range(img.height)]
        rows, start = [], None
        for y, d in enumerate(dark + [False]):
            if d and start is None:
                start = y
            elif not d and start is not None:
                rows.append((start + y) // 2)
                start = None
        return rows

    def xdotool(self, *args: str) -> None:
        subprocess.run(["xdotool", *args], env=self.env, check=True, timeout=10)

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def test_tray_without_a_desktop_says_so_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    res = subprocess.run([*SYNORD, "--home", str(tmp_path), "tray"], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=30)
    assert res.returncode == 1
    assert res.stderr.startswith("synord: the tray needs") and len(res.stderr.strip().splitlines()) == 1


@pytest.fixture
def desktop(tmp_path):
    why = _gtk_missing()
    if why:
        pytest.skip(why)
    d = Desktop(tmp_path)
    try:
        yield d
    finally:
        d.close()


def test_tray_shows_state_and_pauses_from_its_menu(cluster, desktop, tmp_path):
    from jobs_helpers import BUSYBOX_DIR, ensure_assets, start_mesh, submit, wait_job
    ensure_assets()
    consumer, (d,) = start_mesh(cluster, 1)  # the tray watches the provider
    log_path = tmp_path / "tray.out"
    opened = tmp_path / "opened"  # what "Open dashboard" hands the browser
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\nprintf %s "$1" > {opened}\n')
    browser.chmod(0o755)
    with open(log_path, "wb") as log:
        tray = subprocess.Popen([*SYNORD, "--home", str(d.home), "tray"], stdout=log, stderr=log,
                                cwd=ROOT, env={**desktop.env, "BROWSER": f"{browser} %s"})
    desktop.procs.append(tray)

    seen = 0  # how much of the tray's log earlier steps consumed

    def shows(text: str):
        """Wait for the tray to log that it shows ``text`` (after what earlier steps saw)."""
        nonlocal seen
        def found():
            at = log_path.read_text().find(text, seen)
            return at + 1 if at >= 0 else 0
        seen = wait_for(found, what=f"the tray to show {text!r}; its log: {log_path.read_text()[-2000:]}")

    def click_menu_item(index: int, of: int, picture: str) -> None:
        """Click the icon, then the index-th of the ``of`` sensitive items of the menu that opens."""
        x, y, w, h = panel
        desktop.xdotool("mousemove", str(x + w // 2), str(y + h // 2), "click", "1")
        # the menu: a new top-level window of the tray process, wider than the icon
        (_, mw, mh, mx, my), = wait_for(
            lambda: [w for w in desktop.windows() if w[0] == "synord-tray" and w[1] > 60 and w[4] >= 0],
            what="the tray's menu")
        items = wait_for(lambda: len(found := desktop.menu_items(desktop.screenshot(picture, (mx, my, mw, mh))))
                         == of and found, what=f"the menu drawn with {of} items")
        desktop.screenshot(picture, (min(mx, x), 0, max(mx + mw, x + w) - min(mx, x), my + mh))  # with the icon
        desktop.xdotool("mousemove", str(mx + mw // 3), str(my + items[index]), "sleep", "0.2", "click", "1")

    shows("synord-contributing Contributing: waiting for work")
    panel = desktop.panel()

    def icon_is(state: str) -> None:
        """The icon in the tray is drawn in that state's colour (a fifth of it at least)."""
        wait_for(lambda: desktop.share(desktop.screenshot(f"tray-{state}", panel), COLOURS[state]) > 0.2,
                 what=f"the {state} icon in the tray")
    icon_is("contributing")

    # a task placed here: "working", until it ends (when we create the file it waits for)
    job_id = submit(consumer, "--runtime", "container", str(BUSYBOX_DIR), "--", "sh", "-c",
                    "while [ ! -e /tmp/go ]; do sleep 0.1; done")
    shows("synord-working Working: 1 task")
    icon_is("working")
    consumer.cli("exec", job_id, "--", "touch", "/tmp/go")
    assert wait_job(consumer, job_id)["state"] == "succeeded"
    shows("synord-contributing Contributing: waiting for work")

    click_menu_item(0, 3, "tray-menu")  # "Pause contributing" (the state line above it is greyed out)
    shows("synord-paused Paused")
    st = d.status()
    assert st["paused"] is True and st["contributing"] is False
    icon_is("paused")

    click_menu_item(0, 3, "tray-menu-paused")  # now "Resume contributing"
    wait_for(lambda: d.status()["paused"] is False, what="the daemon to resume")
    shows("synord-contributing Contributing")

    click_menu_item(1, 3, "tray-menu-dashboard")  # "Open dashboard"
    token = (d.home / "api.token").read_text().strip()
    assert wait_for(lambda: opened.exists() and opened.read_text(), what="the browser opened") == \
        f"{d.status()['api']}/#token={token}"

    d.stop()
    shows("synord-offline Offline: the daemon is not running")
    icon_is("offline")

    click_menu_item(1, 2, "tray-menu-offline")  # "Quit tray"
    assert tray.wait(10) == 0


def test_install_desktop_puts_the_tray_in_autostart(tmp_path):
    script = ROOT / "packaging" / "desktop" / "install-desktop.sh"
    fake = tmp_path / "bin" / "synord"  # any executable stands for synord here
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_DATA_HOME": str(tmp_path / "data")}
    res = subprocess.run(["bash", str(script), "--synord", str(fake)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    tray = (tmp_path / "config" / "autostart" / "synord-tray.desktop").read_text()
    assert f"\nExec={fake} tray\n" in tray and "\nType=Application\n" in tray
    launcher = (tmp_path / "data" / "applications" / "synord-dashboard.desktop").read_text()
    assert f"\nExec={fake} dashboard --open\n" in launcher
    icons = tmp_path / "data" / "icons" / "hicolor" / "scalable" / "apps"
    assert {p.name for p in icons.iterdir()} == {f"synord-{s}.svg" for s in COLOURS}
    if shutil.which("desktop-file-validate"):
        for path in (tmp_path / "config" / "autostart" / "synord-tray.desktop",
                     tmp_path / "data" / "applications" / "synord-dashboard.desktop"):
            check = subprocess.run(["desktop-file-validate", str(path)], capture_output=True, text=True)
            assert check.returncode == 0 and not check.stdout.strip(), check.stdout
    # a path that cannot go in Exec= unquoted is refused, in one line
    spaced = tmp_path / "my bin" / "synord"
    spaced.parent.mkdir()
    shutil.copy(fake, spaced)
    res = subprocess.run(["bash", str(script), "--synord", str(spaced)], capture_output=True, text=True, env=env)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    res = subprocess.run(["bash", str(script), "--uninstall"], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and not (tmp_path / "config" / "autostart" / "synord-tray.desktop").exists()
    assert not list(icons.iterdir())


def test_tray_speaks_status_notifier_item_to_a_panel(cluster, desktop, tmp_path):
    """The desktop standard's path: with a StatusNotifierWatcher on the session bus (a panel's
    host, tests/sni_host.py), the icon and menu travel over D-Bus, and a click there pauses."""
    import json
    if not shutil.which("dbus-daemon"):
        pytest.skip("needs dbus-daemon (package dbus)")
    bus = subprocess.Popen(["dbus-daemon", "--session", "--nofork", f"--address=unix:path={tmp_path}/bus",
                            "--print-address"], stdout=subprocess.PIPE, text=True)
    desktop.procs.append(bus)
    env = {**desktop.env, "DBUS_SESSION_BUS_ADDRESS": bus.stdout.readline().strip()}
    host = subprocess.Popen([SYSTEM_PYTHON, str(ROOT / "tests" / "sni_host.py")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    desktop.procs.append(host)
    assert json.loads(host.stdout.readline()) == {"ok": "ready"}

    def ask(command: str):
        host.stdin.write(command + "\n")
        host.stdin.flush()
        answer = json.loads(host.stdout.readline())
        if "error" in answer:
            raise AssertionError(answer["error"])
        return answer["ok"]

    d = cluster.start("a")
    with open(tmp_path / "tray.out", "wb") as log:
        tray = subprocess.Popen([*SYNORD, "--home", str(d.home), "tray"], stdout=log, stderr=log,
                                cwd=ROOT, env=env)
    desktop.procs.append(tray)
    wait_for(lambda: ask("items"), what="the tray to register its StatusNotifierItem")
    props = wait_for(lambda: (p := ask("props"))["IconName"] == "synord-contributing" and p,
                     what="the contributing icon over D-Bus")
    assert props["Status"] == "Active" and props["IconThemePath"] == str(ROOT / "synord" / "icons")
    menu = wait_for(lambda: [e for e in ask("menu") if e["visible"]], what="the menu over D-Bus")
    assert [(e["label"], e["enabled"]) for e in menu] == [
        ("Contributing: waiting for work", False), ("Pause contributing", True),
        ("Open dashboard", True), ("Quit tray", True)]

    ask("click Pause contributing")
    wait_for(lambda: d.status()["paused"], what="the daemon paused")
    wait_for(lambda: ask("props")["IconName"] == "synord-paused", what="the paused icon over D-Bus")
    assert "Resume contributing" in [e["label"] for e in ask("menu") if e["visible"]]
    ask("click Quit tray")
    assert tray.wait(10) == 0
