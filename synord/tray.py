"""`synord tray`: a tray icon, a thin client of the control API.

The icon says contributing / working / paused / offline; its menu has the
state in words (with the reason when not contributing), Pause or Resume, Open
dashboard and Quit.

Why GTK's AppIndicator (Ayatana) and not pystray: AppIndicator speaks the
desktop's standard, StatusNotifierItem over D-Bus (KDE, GNOME with the
AppIndicator extension, XFCE, Cinnamon, MATE, ...), and where no
StatusNotifierWatcher runs it falls back by itself to a GtkStatusIcon in an
XEmbed tray (the system tray protocol of older panels, and of our Xvfb test).
pystray's AppIndicator backend cannot react to a click on the icon (its
known issue: only the menu works there) and its Xorg backend has no menu at
all; with AppIndicator directly both paths show the same menu on a click.

The bindings (python3-gi, gir1.2-gtk-3.0, gir1.2-ayatanaappindicator3-0.1)
come from Debian: PyGObject has no wheels and must match the system's GLib.
When the interpreter running synord lacks them (a virtualenv), the tray runs
itself under the system's python3, which needs only the standard library and
these bindings (synord.client is stdlib only).

The API is polled on a worker thread (every call has a deadline) and the
result handed to the GTK main loop; menu actions run on a thread too, so a
slow daemon never freezes the desktop's panel.
"""

from __future__ import annotations

import os
import sys
import threading
import webbrowser
from dataclasses import dataclass
from pathlib import Path

from .client import ApiClient, ClientError
from .home import Home

ICONS = Path(__file__).resolve().parent / "icons"
POLL_S = 2.0
SYSTEM_PYTHON = "/usr/bin/python3"
APT_HINT = "apt install python3-gi gir1.2-gtk-3.0 gir1.2-ayatanaappindicator3-0.1"


@dataclass(frozen=True)
class TrayState:
    icon: str  # one of the icons/synord-*.svg names
    label: str  # the menu's first line
    can_pause: bool
    can_resume: bool


def describe(status: dict | None, error: str | None = None) -> TrayState:
    """What the tray shows for one /v1/status answer (None: the daemon is not reachable)."""
    if status is None:  # the full reason goes to the log; the menu keeps it short
        why = "the daemon is not running" if not error or "not running" in error else "the daemon does not answer"
        return TrayState("synord-offline", f"Offline: {why}", False, False)
    if status.get("paused"):
        return TrayState("synord-paused", "Paused", False, True)
    if not status.get("contributing"):
        why = status.get("why_not") or "; ".join(status.get("reasons") or []) or "unknown"
        return TrayState("synord-paused", f"Not contributing: {why}", True, False)
    n = status.get("running_tasks") or 0
    if n:
        return TrayState("synord-working", f"Working: {n} task{'s' if n != 1 else ''}", True, False)
    return TrayState("synord-contributing", "Contributing: waiting for work", True, False)


class Tray:
    def __init__(self, home: Home):
        import gi
        gi.require_version("Gtk", "3.0")
        gi.require_version("AyatanaAppIndicator3", "0.1")
        from gi.repository import AyatanaAppIndicator3 as AppIndicator
        from gi.repository import GLib, Gtk

        self.GLib, self.Gtk = GLib, Gtk
        GLib.set_prgname("synord-tray")  # names its windows (WM_CLASS), whichever interpreter runs it
        self.home = home
        self._client: ApiClient | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.state: TrayState | None = None

        self.indicator = AppIndicator.Indicator.new(
            "synord", "synord-offline", AppIndicator.IndicatorCategory.APPLICATION_STATUS)
        self.indicator.set_icon_theme_path(str(ICONS))
        self.indicator.set_title("synord")
        self.indicator.set_status(AppIndicator.IndicatorStatus.ACTIVE)

        self._show(TrayState("synord-offline", "Connecting to the daemon…", False, False))

    # ---- the GTK side (main loop only) ----------------------------------------------

    def _show(self, state: TrayState) -> bool:
        if state != self.state:
            self.state = state
            self.indicator.set_icon_full(state.icon, state.label)
            self.indicator.set_title(f"synord: {state.label}")
            # A new menu per state: a reused one pops up at its old width (off the screen's edge).
            self.indicator.set_menu(self._menu(state))
            print(f"tray: {state.icon} {state.label}", flush=True)  # a log line per change
        return False  # one-shot idle callback

    def _menu(self, state: TrayState):
        Gtk = self.Gtk
        menu = Gtk.Menu()
        line = Gtk.MenuItem(label=state.label)
        line.set_sensitive(False)  # the state, in words: not an action
        menu.append(line)
        menu.append(Gtk.SeparatorMenuItem())
        actions = []
        if state.can_pause:
            actions.append(("Pause contributing", lambda _: self._in_thread(self._post, "/v1/pause")))
        if state.can_resume:
            actions.append(("Resume contributing", lambda _: self._in_thread(self._post, "/v1/resume")))
        actions.append(("Open dashboard", lambda _: self._in_thread(self._open_dashboard)))
        for label, action in actions:
            item = Gtk.MenuItem(label=label)
            item.connect("activate", action)
            menu.append(item)
        menu.append(Gtk.SeparatorMenuItem())
        quit_item = Gtk.MenuItem(label="Quit tray")
        quit_item.connect("activate", lambda _: self.quit())
        menu.append(quit_item)
        menu.show_all()
        return menu

    def run(self) -> None:
        threading.Thread(target=self._poll, name="synord-tray-poll", daemon=True).start()
        self.Gtk.main()

    def quit(self) -> bool:
        self._stop.set()
        self._wake.set()
        self.Gtk.main_quit()
        return False  # as a GLib source: once

    # ---- the worker side (threads: blocking calls, each with a deadline) ------------------

    def client(self) -> ApiClient:
        if self._client is None:  # (re)read api.json: the daemon may have (re)started
            self._client = ApiClient(self.home, timeout=5.0)
        return self._client

    def _poll(self) -> None:
        last_error = None
        while not self._stop.is_set():
            try:
                state = describe(self.client().get("/v1/status"))
                last_error = None
            except ClientError as exc:
                if str(exc) != last_error:  # once per distinct reason, not every poll
                    print(f"tray: {exc}", file=sys.stderr, flush=True)
                    last_error = str(exc)
                self._client = None
                state = describe(None, str(exc))
            self.GLib.idle_add(self._show, state)
            self._wake.wait(POLL_S)
            self._wake.clear()

    def _in_thread(self, fn, *args) -> None:
        threading.Thread(target=fn, args=args, daemon=True).start()

    def _post(self, path: str) -> None:
        try:
            self.client().post(path)
        except ClientError as exc:
            print(f"tray: {path}: {exc}", file=sys.stderr, flush=True)
        self._wake.set()  # show the new state now

    def _open_dashboard(self) -> None:
        try:
            webbrowser.open(self.client().dashboard_url())
        except ClientError as exc:
            print(f"tray: dashboard: {exc}", file=sys.stderr, flush=True)


def _have_gtk() -> str | None:
    """None if the GTK bindings load here; else why not."""
    try:
        import gi
        gi.require_version("Gtk", "3.0")
        gi.require_version("AyatanaAppIndicator3", "0.1")
        return None
    except (ImportError, ValueError) as exc:
        return str(exc)


def main(home: Home) -> int:
    missing = _have_gtk()
    if missing is not None:
        if (os.environ.get("SYNORD_TRAY_REEXEC") != "1" and os.path.exists(SYSTEM_PYTHON)
                and os.path.realpath(sys.executable) != os.path.realpath(SYSTEM_PYTHON)):
            env = dict(os.environ, SYNORD_TRAY_REEXEC="1")
            root = str(Path(__file__).resolve().parent.parent)
            env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            os.execve(SYSTEM_PYTHON, [SYSTEM_PYTHON, "-m", "synord.tray", str(home.path)], env)
        raise SystemExit(f"synord: the tray needs GTK's AppIndicator bindings ({missing}); {APT_HINT}")
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        raise SystemExit("synord: the tray needs a desktop session (no DISPLAY or WAYLAND_DISPLAY)")
    import signal
    tray = Tray(home)
    for sig in (signal.SIGTERM, signal.SIGINT):  # through GLib: Python handlers wait for Gtk.main
        tray.GLib.unix_signal_add(tray.GLib.PRIORITY_DEFAULT, sig, tray.quit)
    tray.run()
    return 0


if __name__ == "__main__":  # `python3 -m synord.tray HOME` (the system interpreter, see above)
    sys.exit(main(Home(Path(sys.argv[1]))))
