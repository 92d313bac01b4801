"""A minimal StatusNotifierWatcher and host on a D-Bus session bus, for test_tray.

Run with the system's python3 (it has Gio): ``python3 sni_host.py`` with
DBUS_SESSION_BUS_ADDRESS set. It takes the watcher's well-known name, accepts
items as a desktop panel's host would, and answers one JSON line per command
read on stdin:

    items                 -> ["<bus name><object path>", ...]
    props                 -> the first item's StatusNotifierItem properties we read
    menu                  -> [{"id", "label", "enabled", "visible"}, ...] of its dbusmenu
    click LABEL           -> sends the menu item with that label a "clicked" event
"""

import json
import sys
import threading

from gi.repository import Gio, GLib

WATCHER_XML = """
<node><interface name="org.kde.StatusNotifierWatcher">
  <method name="RegisterStatusNotifierItem"><arg type="s" direction="in"/></method>
  <method name="RegisterStatusNotifierHost"><arg type="s" direction="in"/></method>
  <property name="RegisteredStatusNotifierItems" type="as" access="read"/>
  <property name="IsStatusNotifierHostRegistered" type="b" access="read"/>
  <property name="ProtocolVersion" type="i" access="read"/>
  <signal name="StatusNotifierItemRegistered"><arg type="s"/></signal>
  <signal name="StatusNotifierItemUnregistered"><arg type="s"/></signal>
  <signal name="StatusNotifierHostRegistered"/>
</interface></node>
"""
ITEM = "org.kde.StatusNotifierItem"
PROPS = ("Id", "Title", "Status", "IconName", "IconThemePath", "Menu")

bus = Gio.bus_get_sync(Gio.BusType.SESSION, None)
items: list[tuple[str, str]] = []  # (bus name, object path)


def on_call(conn, sender, path, iface, method, params, invocation):
    if method == "RegisterStatusNotifierItem":
        arg = params.unpack()[0]
        # AppIndicator passes its object path; others pass a bus name (path then the default)
        item = (sender, arg) if arg.startswith("/") else (arg, "/StatusNotifierItem")
        items.append(item)
        conn.emit_signal(None, path, iface, "StatusNotifierItemRegistered", GLib.Variant("(s)", ("".join(item),)))
    invocation.return_value(None)


def on_get(conn, sender, path, iface, prop):
    return {"RegisteredStatusNotifierItems": GLib.Variant("as", ["".join(i) for i in items]),
            "IsStatusNotifierHostRegistered": GLib.Variant("b", True),
            "ProtocolVersion": GLib.Variant("i", 0)}[prop]


def call(name, path, iface, method, args, reply):
    return bus.call_sync(name, path, iface, method, args, GLib.VariantType(reply) if reply else None,
                         Gio.DBusCallFlags.NONE, 5000, None).unpack()


def flatten(layout, out):
    item_id, props, children = layout
    if item_id != 0 and props.get("type") != "separator":
        out.append({"id": item_id, "label": props.get("label", ""), "enabled": props.get("enabled", True),
                    "visible": props.get("visible", True)})
    for child in children:
        flatten(child, out)
    return out


def menu():
    name, path = items[0]
    menu_path = call(name, path, "org.freedesktop.DBus.Properties", "Get",
                     GLib.Variant("(ss)", (ITEM, "Menu")), "(v)")[0]
    _, layout = call(name, menu_path, "com.canonical.dbusmenu", "GetLayout",
                     GLib.Variant("(iias)", (0, -1, [])), "(u(ia{sv}av))")
    return name, menu_path, flatten(layout, [])


def command(line: str):
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "items":
        return ["".join(i) for i in items]
    if cmd == "props":
        name, path = items[0]
        return {p: call(name, path, "org.freedesktop.DBus.Properties", "Get",
                        GLib.Variant("(ss)", (ITEM, p)), "(v)")[0] for p in PROPS}
    if cmd == "menu":
        return menu()[2]
    if cmd == "click":
        name, menu_path, entries = menu()
        (entry,) = [e for e in entries if e["label"] == arg and e["visible"]]
        call(name, menu_path, "com.canonical.dbusmenu", "Event",
             GLib.Variant("(isvu)", (entry["id"], "clicked", GLib.Variant("i", 0), 0)), None)
        return entry
    raise ValueError(f"unknown command {cmd!r}")


def serve_stdin(loop):
    for line in sys.stdin:
        try:
            # D-Bus calls block: run them on the main loop's thread, wait for the answer here
            done, box = threading.Event(), {}

            def run():
                try:
                    box["ok"] = command(line)
                except Exception as exc:  # the test reads the error and retries or fails
                    box["error"] = f"{type(exc).__name__}: {exc}"
                done.set()
                return False
            GLib.idle_add(run)
            done.wait()
            print(json.dumps(box), flush=True)
        except BrokenPipeError:
            break
    loop.quit()


def main():
    node = Gio.DBusNodeInfo.new_for_xml(WATCHER_XML)
    bus.register_object("/StatusNotifierWatcher", node.interfaces[0], on_call, on_get, None)
    (owned,) = call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "RequestName",
                    GLib.Variant("(su)", ("org.kde.StatusNotifierWatcher", 0)), "(u)")
    assert owned == 1, f"another StatusNotifierWatcher runs on this bus ({owned})"
    loop = GLib.MainLoop()
    threading.Thread(target=serve_stdin, args=(loop,), daemon=True).start()
    print(json.dumps({"ok": "ready"}), flush=True)
    loop.run()


if __name__ == "__main__":
    main()
