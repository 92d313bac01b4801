"""`synord` command line (../shared/CLI.md is the contract).

Read commands take --json and then print exactly one JSON document on stdout.
Errors: one line on stderr, non-zero exit. This module imports only the
standard library and small synord modules: the networking stack is loaded by
`synord daemon` alone, so `synord status` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from synord.protocols.kinds import RUNTIME_KINDS

from . import __version__
from . import humanize as hz
from .cli_errors import CliError  # command modules raise it too
from .home import Home, default_home

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        raise CliError(f"{self.prog}: {message} (see `{self.prog} --help`)", EXIT_USAGE)


def parse_size(text: str) -> int:
    """'512M', '1G', '256MiB', '1048576' -> bytes."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G)") from None


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _client(args):
    from .client import ApiClient
    return ApiClient(Home(args.home))


def _emit(args, data: Any, human: Callable[[Any], str]) -> None:
    if getattr(args, "json", False):
        json.dump(data, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(human(data).rstrip("\n") + "\n")


def _table(rows: list[list[str]], header: list[str]) -> str:
    return hz.table(rows, header)


# ---- commands ---------------------------------------------------------------

def cmd_init(args) -> int:
    from synord.protocols.identity import load_or_create
    from .config import default_toml
    home = Home(args.home)
    home.ensure()
    ident, created = load_or_create(home.path)
    if not home.config.exists():
        home.config.write_text(default_toml())
    home.ensure_token()
    _emit(args, {"peer_id": ident.peer_id, "home": str(home.path), "created": created},
          lambda d: f"{'created' if created else 'kept'} identity {d['peer_id']} in {d['home']}")
    return 0


def cmd_daemon(args) -> int:
    from .config import ConfigError, load
    from .daemon import DaemonOptions
    from . import logs
    home = Home(args.home)
    if not home.identity.exists():
        raise CliError(f"no identity in {home.path}: run `synord --home {home.path} init` first")
    try:
        cfg = load(home.config)
        DaemonOptions(listen=args.listen, bootstrap=args.bootstrap, api=args.api,
                      mdns=False if args.no_mdns else None).apply(cfg)
        from .config import validate
        validate(cfg)
    except ConfigError as exc:
        raise CliError(f"invalid configuration: {exc}") from None
    logs.setup(cfg["log.level"])
    from .daemon import run
    return run(home, cfg)


def cmd_status(args) -> int:
    data = _client(args).get("/v1/status")
    _emit(args, data, lambda d: "\n".join([
        f"peer id      {d['peer_id']}",
        f"version      {d['version']}",
        f"uptime       {hz.duration(d['uptime_s'])}",
        f"peers        {d['peers']}",
        f"contributing {hz.yes_no(d['contributing'], d.get('why_not'))}",
        "storage      " + ("ok" if d.get("storage", {}).get("ok", True) else f"NOT OK: {d['storage']['reason']}"),
        "addrs        " + ("\n             ".join(d["addrs"]) or "-"),
        "reachable    " + _reachable_line(d.get("reachability") or {}),
    ]))
    return 0


def _reachable_line(r: dict) -> str:
    line = r.get("status", "unknown")
    if r.get("observed_addrs"):
        line += " (seen at " + ", ".join(r["observed_addrs"]) + ")"
    if r.get("relays"):
        line += ", relays: " + ", ".join(r["relays"])
    return line + ("" if line.startswith("public") else "; `synord doctor` says why")


def cmd_doctor(args) -> int:
    """Checks with ok/reason: from the running daemon, or on the home itself when it is not running."""
    from .client import ClientError
    try:
        data = _client(args).get("/v1/doctor")
        data["daemon"] = "running"
    except ClientError as exc:
        if "not running" not in str(exc) and "not reachable" not in str(exc):
            raise
        data = _offline_doctor(Home(args.home))
    _emit(args, data, lambda d: "\n".join(
        f"{'ok  ' if c['ok'] else 'FAIL'}  {c['name']}" + (f": {c['reason']}" if c.get("reason") else "")
        for c in d["checks"]))
    if not data["ok"]:
        failed = [c["name"] for c in data["checks"]
                  if not c["ok"] and not c["name"].startswith(("runtime.", "network."))]
        raise CliError(f"doctor: not ok: {', '.join(failed)}")
    return 0


def _offline_doctor(home: Home) -> dict:
    """What can be checked without the daemon: the config, the state store, free space."""
    from .config import ConfigError, load
    from .storage_health import StorageHealth
    from .store import check_file
    checks = []
    try:
        cfg = load(home.config)
        checks.append({"name": "config", "ok": True, "reason": None})
        min_free = cfg["storage.min_free_bytes"]
    except ConfigError as exc:
        checks.append({"name": "config", "ok": False, "reason": str(exc)})
        min_free = 0
    if not home.db.exists():
        checks.append({"name": "state_store", "ok": True, "reason": "no state.db yet (created at first start)"})
    elif home.db.stat().st_size == 0:
        checks.append({"name": "state_store", "ok": False,
                       "reason": f"{home.db} is empty: the daemon will start with a fresh store"})
    else:
        problem = check_file(home.db)
        checks.append({"name": "state_store", "ok": problem is None, "reason": problem})
    if home.path.is_dir():
        st = StorageHealth(home.path, min_free)
        st.check()
        checks.append({"name": "storage", "ok": st.ok, "reason": st.reason, "free_bytes": st.free_bytes})
    return {"ok": all(c["ok"] for c in checks), "daemon": "not running", "checks": checks}


def cmd_peers(args) -> int:
    data = _client(args).get("/v1/peers")

    def human(peers):
        rows = []
        for p in peers:
            caps = p.get("capabilities") or {}
            devs = ", ".join(sorted({d.get("kind", "?") for d in caps.get("devices", [])})) or "-"
            rows.append([p["peer_id"], devs, hz.ago(p.get("last_seen")), (p.get("addrs") or ["-"])[0]])
        return _table(rows, ["PEER", "DEVICES", "SEEN", "ADDR"])
    _emit(args, data, human)
    return 0


def cmd_probe(args) -> int:
    try:
        data = _client(args).get("/v1/probe" + ("?bench=1" if args.bench else ""))
    except Exception as exc:
        from .client import ClientError
        if not isinstance(exc, ClientError) or "not running" not in str(exc):
            raise
        data = _local_probe(args.bench)  # no daemon: probe in-process

    def human(d):
        lines = []
        for dev in d.get("devices", []):
            tp = dev.get("throughput") or {}
            mem = dev.get("memory_bytes") or 0
            lines.append(f"{dev.get('kind', '?'):7} {dev.get('vendor') or '-'} {dev.get('model') or '-'}"
                         f"  mem {hz.size(mem)}  fp32 {tp.get('fp32_gflops') or '-'} GFLOPS"
                         + (f" (measured {tp['measured_fp32_gflops']:.1f})"
                            if tp.get("measured_fp32_gflops") else ""))
        for kind, rt in sorted(d.get("runtimes", {}).items()):
            lines.append(f"runtime {kind:9} {'yes' if rt['available'] else 'no '}  {rt.get('reason', '')}")
        return "\n".join(lines)
    _emit(args, data, human)
    return 0


def _local_probe(bench: bool) -> dict:
    from synord import hwprobe
    from synord.runtimes import available_all
    return hwprobe.probe(bench=bench, runtimes=available_all()).to_json()


def cmd_book(args) -> int:
    path = "/v1/book" + (f"?class={args.cls}" if args.cls else "")
    data = _client(args).get(path)

    _emit(args, data, _book_text)
    return 0


def _book_text(d: dict) -> str:
    classes = d.get("classes", {})
    short = hz.short_ids(o["peer"] for side in classes.values()
                         for o in side.get("asks", []) + side.get("bids", []))
    out = []
    for cls, side in sorted(classes.items()):
        lt = side.get("last_trade")
        trade = (f"{hz.price(lt['price'])} x {lt['units']:g} ({hz.ago(lt.get('ts'))})" if lt else "none yet")
        out.append(f"[{cls}]  best ask {hz.price(side.get('best_ask'))}  best bid "
                   f"{hz.price(side.get('best_bid'))}  last trade {trade}")
        rows = [["ask", short.get(a["peer"], "-"), f"{a['cores']:g}", hz.size(a["memory"]), hz.price(a["price"]),
                 ",".join(a.get("runtimes") or []) or "-", "yes" if a.get("preemptible") else "no",
                 hz.ago(a.get("expires"))] for a in side.get("asks", [])]
        rows += [["bid", short.get(b["peer"], "-"), f"{b['cores']:g}", hz.size(b["memory"]),
                  hz.price(b["max_price"]), b.get("runtime") or "-", "ok" if b.get("preemptible_ok") else "no",
                  hz.ago(b.get("expires"))] for b in side.get("bids", [])]
        out.append(hz.table(rows, ["SIDE", "PEER", "CORES", "MEMORY", "PRICE", "RUNTIMES", "PREEMPTIBLE",
                                   "EXPIRES"], right=(2, 3, 4)))
    return "\n".join(out) or "(empty book)"


def cmd_ledger(args) -> int:
    data = _client(args).get("/v1/ledger")
    _emit(args, data, _ledger_text)
    return 0


def _ledger_text(d: dict) -> str:
    receipts = d.get("receipts", [])
    earned = sum(r["amount"] for r in receipts if r.get("role") == "provider")
    paid = sum(r["amount"] for r in receipts if r.get("role") == "consumer")
    other = {r["agreement_id"]: r["consumer"] if r.get("role") == "provider" else r["provider"] for r in receipts}
    short = hz.short_ids(other.values())
    rows = [[hz.ago(r.get("ended")), "earned" if r.get("role") == "provider" else "paid",
             short.get(other[r["agreement_id"]], "-"), r.get("outcome", "-"), hz.duration(r.get("cpu_s")),
             hz.duration(r.get("wall_s")), hz.size(r.get("peak_memory")), hz.price(r.get("price")),
             f"{r.get('units', 0):g}", hz.amount(r.get("amount"))] for r in receipts]
    return "\n".join([
        f"balance   {hz.amount(d.get('balance'))}   (earned {hz.amount(earned)} as a provider, "
        f"paid {hz.amount(paid)} as a consumer; the last {len(receipts)} receipts below)",
        hz.table(rows, ["WHEN", "", "PEER", "OUTCOME", "CPU", "WALL", "PEAK MEM", "PRICE", "UNITS", "AMOUNT"],
                 right=(4, 5, 6, 7, 8, 9))])


def _limit_value(text: str):
    """KEY=VALUE values: true/false, numbers, empty = clear, else the string."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("", "none"):
        return None
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        return text


def cmd_limits(args) -> int:
    client = _client(args)
    if args.set:
        body = {k: _limit_value(v) for k, v in args.set}
        data = client.post("/v1/limits", body)
    else:
        data = client.get("/v1/limits")
    _emit(args, data, _limits_text)
    return 0


def _pref_value(kind: str, v) -> str:
    if v is None or v == "":
        return "any" if kind in ("hours", "weekly") else "-"
    if kind == "share":
        return f"{v * 100:g} %"
    if kind == "percent":
        return f"{v:g} %"
    if kind == "bool":
        return "yes" if v else "no"
    if kind == "seconds":
        return hz.duration(v)
    if kind in ("bytes", "bytes/s"):
        return "no limit" if not v else (hz.size(v) if kind == "bytes" else hz.rate(v))
    return str(v)


def _limits_text(d: dict) -> str:
    keys = d.get("keys") or [{"key": k, "value": v, "type": "", "evaluable": True}
                             for k, v in sorted(d["limits"].items())]
    rows = []
    for k in keys:
        note = k.get("note") or ""
        if k.get("overridden"):
            note = (f"set live (config.toml: {_pref_value(k['type'], k.get('config'))})"
                    + ("; " + note if note else ""))
        rows.append([k["key"], _pref_value(k["type"], k["value"]), note])
    usage = d.get("usage") or {}
    lines = [f"contributing  {hz.yes_no(d.get('contributing', d['allowed']), d.get('why_not'))}"]
    if usage:
        lines.append(f"task cache    {hz.size(usage.get('cache_bytes'))}, transferred today "
                     f"{hz.size(usage.get('transferred_today_bytes'))}")
    if d.get("throttle") is not None and d["throttle"] < 1:
        lines.append(f"cpu throttle  container tasks get {d['throttle'] * 100:g} % of their cores (cpu.max)")
    return "\n".join(lines + ["", hz.table(rows, ["PREFERENCE", "VALUE", "NOTE"])])


def cmd_pause(args) -> int:
    data = _client(args).post("/v1/pause")
    _emit(args, data, lambda d: "paused: no new work; running tasks are handed elsewhere")
    return 0


def cmd_resume(args) -> int:
    data = _client(args).post("/v1/resume")
    _emit(args, data, lambda d: "resumed: taking work again")
    return 0


def cmd_jobs(args) -> int:
    data = _client(args).get("/v1/jobs")
    _emit(args, data, _jobs_text)
    return 0


def _jobs_text(jobs: list) -> str:
    def peer(j):  # the other side: our provider, or the consumer we run it for
        return j.get("consumer") if j.get("role") == "provider" else j.get("provider")
    short = hz.short_ids(peer(j) for j in jobs)
    return hz.table(
        [[j["id"], j.get("role", "consumer"), j["state"], j["runtime"], short.get(peer(j), "-"),
          hz.ago(j.get("created")), "-" if j.get("exit_code") is None else j["exit_code"]] for j in jobs],
        ["ID", "ROLE", "STATE", "RUNTIME", "PEER", "SUBMITTED", "EXIT"])


def cmd_job(args) -> int:
    data = _client(args).get(f"/v1/jobs/{args.id}")
    _emit(args, data, _job_text)
    return 0


def _job_text(j: dict) -> str:
    """`synord job ID`: a summary a person reads (the document stays behind --json)."""
    state = j["state"] + ("" if j.get("exit_code") is None else f" (exit {j['exit_code']})")
    lines = [f"job        {j['id']}", f"state      {state}", f"runtime    {j.get('runtime') or '-'}"]
    if j.get("role") == "provider":  # a task this machine runs for someone
        lines += [f"role       provider: this machine runs it for {j.get('consumer')}",
                  f"started    {hz.ago(j.get('started') or j.get('created'))}"]
        if j.get("cpus") is not None:
            lines.append(f"resources  {j['cpus']:g} cores, {hz.size(j.get('memory_bytes'))}"
                         + (f"; cpu.max {j['cpu_max']}" if j.get("cpu_max") else ""))
        if j.get("price") is not None:
            lines.append(f"price      {hz.price(j['price'])} x {j.get('units', 0):g} units")
        if j.get("output_bytes"):
            lines.append(f"output     {hz.size(j['output_bytes'].get('stdout'))} stdout, "
                         f"{hz.size(j['output_bytes'].get('stderr'))} stderr")
        if j.get("preempt"):
            lines.append(f"preempted  {j['preempt'].get('reason')}")
    else:
        lines += [f"artefact   {j.get('artifact') or '-'}"
                  + (f"  args {' '.join(j['args'])}" if j.get("args") else ""),
                  f"submitted  {hz.ago(j.get('created'))}",
                  f"provider   {j.get('provider') or '-'}"]
        if j.get("checkpoint"):
            lines.append(f"checkpoint {hz.size(j['checkpoint'].get('bytes'))}")
    if j.get("error"):
        lines.append(f"error      {j['error']}")
    history = j.get("history") or []
    if history:
        short = hz.short_ids(h.get("provider") for h in history)
        rows = []
        for i, h in enumerate(history, 1):
            ran = (h["end"] - h["start"]) if h.get("end") and h.get("start") else None
            ended = h.get("ended") or "running"
            if h.get("preempt_reason"):
                ended += f": {h['preempt_reason']}"
            elif h.get("reason"):
                ended += f": {h['reason']}"
            rows.append([i, short.get(h.get("provider"), "-"), h.get("mode") or "-", hz.ago(h.get("start")),
                         hz.duration(ran), hz.size(h.get("checkpoint_bytes")), hz.price(h.get("price")), ended])
        lines += ["", "placements", hz.table(rows, ["#", "PROVIDER", "MODE", "STARTED", "RAN", "CHECKPOINT",
                                                    "PRICE", "ENDED"], right=(4, 5, 6))]
    return "\n".join(lines)


def _write_output(item: dict) -> None:
    """One NDJSON output line to our stdout or stderr, byte for byte."""
    out = sys.stdout if item.get("stream") == "stdout" else sys.stderr
    out.flush()
    # the daemon decodes with surrogateescape, so any bytes round-trip
    out.buffer.write(item["data"].encode("utf-8", "surrogateescape"))
    out.buffer.flush()


def _print_output(client, job_id: str, follow: bool, errors: list | None = None) -> int | None:
    exit_code = None
    for item in client.stream(f"/v1/jobs/{job_id}/logs" + ("?follow=1" if follow else "")):
        if "data" in item:
            _write_output(item)
        elif "progress" in item:
            sys.stderr.write(f"synord: {item['progress']}\n")
        if "exit_code" in item:
            exit_code = item["exit_code"]
        if "error" in item:
            msg = item["error"]
            for said in errors or []:  # a reason already printed (run's "waiting" line) is not repeated
                msg = msg.replace(said, "see above") if said else msg
            sys.stderr.write(f"synord: job {job_id}: {msg}\n")
            if errors is not None:
                errors.append(item["error"])
    return exit_code


def cmd_logs(args) -> int:
    _print_output(_client(args), args.id, args.follow)
    return 0


def cmd_cancel(args) -> int:
    data = _client(args).post(f"/v1/jobs/{args.id}/cancel")
    _emit(args, data, lambda d: f"job {args.id}: {d.get('state')}")
    return 0


def cmd_run(args) -> int:
    artifact = Path(args.artifact).resolve()
    if not artifact.exists():
        raise CliError(f"artefact {args.artifact} does not exist")
    spec = {"artifact": str(artifact), "runtime": args.runtime, "args": args.args,
            "cpus": args.cpus, "memory_bytes": args.memory, "max_price": args.max_price,
            "timeout_s": args.timeout, "checkpointable": args.checkpointable,
            "env": dict(args.env)}
    if args.image_ref:
        spec["image_ref"] = args.image_ref
    if args.gpus:
        spec.update(gpus=args.gpus, gpu_class=args.gpu_class, gpu_memory=args.gpu_memory,
                    cuda_capability=args.cuda_capability)
    client = _client(args)
    job = client.post("/v1/jobs", spec)
    if args.detach:
        _emit(args, job, lambda j: j["id"])
        return 0
    sys.stderr.write(f"synord: job {job['id']} submitted\n")
    errors: list = []
    from .run_progress import RunProgress
    progress = RunProgress(_client(args), job["id"])  # phases and notices on stderr
    try:
        errors.append(_say_if_waiting(client, job["id"]))
        progress.until_running()
        with progress:  # later notices (a migration) while the output streams
            code = _print_output(client, job["id"], follow=True, errors=errors)
    except KeyboardInterrupt:
        client.post(f"/v1/jobs/{job['id']}/cancel")
        sys.stderr.write(f"synord: job {job['id']} cancelled\n")
        return 130
    final = client.get(f"/v1/jobs/{job['id']}")
    if final.get("state") != "succeeded" and final.get("error") and final["error"] not in errors:
        sys.stderr.write(f"synord: job {job['id']} {final['state']}: {final['error']}\n")
    if code is None:
        code = final.get("exit_code")
    return 1 if code is None else int(code)


def _say_if_waiting(client, job_id: str, within_s: float = 0.8) -> str | None:
    """If no provider matches the job, say so at once, with the book's reason;
    if providers match but placement takes longer than ``within_s``, say that.
    Returns the reason it printed (not to be repeated when the job fails)."""
    import time
    deadline = time.monotonic() + within_s
    while True:
        p = client.get(f"/v1/jobs/{job_id}/placement")
        if not p.get("waiting"):
            return None
        if not p.get("candidates") or time.monotonic() >= deadline:
            what = "waiting for a provider" if not p.get("candidates") else "still negotiating"
            sys.stderr.write(f"synord: {what} (up to {hz.duration(p['placement_timeout_s'])}): {p.get('why')}\n")
            sys.stderr.flush()
            return p.get("why")
        time.sleep(0.1)


def _feed_stdin(client, session: str, raw: bool = False) -> None:
    """Forward our stdin to an interactive exec session (a thread): line by line
    as it comes, or on a terminal in raw mode, keystroke by keystroke."""
    from .client import ClientError
    path = f"/v1/exec/{session}/stdin"
    fd = sys.stdin.fileno()
    try:
        if raw:
            while data := os.read(fd, 4096):
                client.post(path, {"data": data.decode("utf-8", "surrogateescape")})
        else:
            for line in iter(sys.stdin.buffer.readline, b""):
                client.post(path, {"data": line.decode("utf-8", "surrogateescape")})
        client.post(path, {"eof": True})
    except (ClientError, OSError, ValueError):
        pass  # the session ended (the command exited): nothing more to send


def _terminal_size() -> dict | None:
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except OSError:
        return None
    return {"rows": max(1, min(size.lines, 1000)), "cols": max(1, min(size.columns, 1000))}


class _RawTerminal:
    """Our terminal in raw mode for a remote one (keys go through, ^C included);
    restored on exit. SIGWINCH sends the new size to the session."""

    def __init__(self, client) -> None:
        self.client, self.session, self.saved = client, None, None

    def __enter__(self):
        import signal
        import termios
        import tty
        if sys.stdin.isatty():
            self.saved = termios.tcgetattr(sys.stdin.fileno())
            tty.setraw(sys.stdin.fileno())
        self._old_winch = signal.signal(signal.SIGWINCH, self._resized)
        return self

    def _resized(self, *_):
        import threading
        size = _terminal_size()
        if self.session and size:
            threading.Thread(target=self._post_size, args=(size,), daemon=True).start()

    def _post_size(self, size: dict) -> None:
        from .client import ClientError
        try:
            self.client.post(f"/v1/exec/{self.session}/stdin", {"resize": size})
        except (ClientError, OSError):
            pass

    def __exit__(self, *exc):
        import signal
        import termios
        signal.signal(signal.SIGWINCH, self._old_winch)
        if self.saved is not None:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self.saved)


def _exec(args, argv: list[str], interactive: bool, tty: bool = False) -> int:
    import contextlib
    import threading
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise CliError("missing command (synord exec JOB -- CMD [ARGS...])", EXIT_USAGE)
    client = _client(args)
    env = dict(args.env)
    body: dict = {"argv": argv, "env": env, "interactive": interactive}
    terminal = contextlib.nullcontext()
    if tty:
        body["tty"] = _terminal_size() or {"rows": 24, "cols": 80}
        env.setdefault("TERM", os.environ.get("TERM") or "xterm")
        terminal = _RawTerminal(client)
    code, error = None, None
    with terminal:
        for item in client.stream(f"/v1/jobs/{args.id}/exec", method="POST", body=body):
            if "session" in item:
                if tty:
                    terminal.session = item["session"]
                threading.Thread(target=_feed_stdin, args=(client, item["session"], tty and sys.stdin.isatty()),
                                 daemon=True).start()
            elif "data" in item:
                _write_output(item)
            elif "exit_code" in item:
                code = item["exit_code"]
            elif "error" in item:
                error = item["error"]
    if code is None:
        raise CliError(f"job {args.id}: {error or 'the exec session ended without an exit code'}")
    code = int(code)
    return code if 0 <= code <= 255 else (128 + (-code & 0x7F) if code < 0 else 255)


def cmd_exec(args) -> int:
    return _exec(args, list(args.argv), args.interactive or args.tty, tty=args.tty)


def cmd_shell(args) -> int:
    tty = sys.stdin.isatty() and sys.stdout.isatty() and not args.no_tty
    if sys.stdin.isatty() and not tty:
        sys.stderr.write(f"synord: shell in job {args.id} (no TTY: type commands, Ctrl-D to end)\n")
    return _exec(args, [args.shell], interactive=True, tty=tty)


def cmd_dashboard(args) -> int:
    url = _client(args).dashboard_url()
    if args.open:
        import webbrowser
        if not webbrowser.open(url):
            raise CliError(f"no web browser found to open the dashboard; open {url}")
    _emit(args, {"url": url}, lambda d: d["url"])
    return 0


def cmd_tray(args) -> int:
    from .tray import main as tray_main
    return tray_main(Home(args.home))


def cmd_sandbox_run(args) -> int:
    from .sandbox_cmd import run_local
    return run_local(args)


def cmd_demo(args) -> int:
    from .demo import main as demo_main
    return demo_main(args)


def cmd_sim(args) -> int:
    from .sim.runner import main as sim_main  # numpy/scipy/matplotlib load here only
    from .sim.scenario import ScenarioError
    try:
        return sim_main(args)
    except ScenarioError as exc:
        raise CliError(str(exc)) from None


# ---- parser -----------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="synord", description="peer-to-peer compute mesh daemon")
    p.add_argument("--version", action="version", version=f"synord {__version__}")
    p.add_argument("--home", type=Path, default=None,
                   help="state directory (default: $SYNORD_HOME or ~/.local/share/synord)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, fn, help_: str, json_flag: bool = True):
        sp = sub.add_parser(name, help=help_, description=help_)
        if json_flag:
            sp.add_argument("--json", action="store_true", help="print one JSON document")
        sp.set_defaults(fn=fn)
        return sp

    add("init", cmd_init, "create the node identity and default config (idempotent)")
    d = add("daemon", cmd_daemon, "run the node in the foreground", json_flag=False)
    d.add_argument("--listen", action="append", metavar="MULTIADDR")
    d.add_argument("--bootstrap", action="append", metavar="MULTIADDR")
    d.add_argument("--api", metavar="HOST:PORT|unix:PATH")
    d.add_argument("--no-mdns", action="store_true")
    add("status", cmd_status, "node status")
    add("peers", cmd_peers, "known peers and their capabilities")
    add("doctor", cmd_doctor, "checks of this node (storage, state store, runtimes, network "
        "reachability) with the reason when not ok")
    pr = add("probe", cmd_probe, "this machine's capability profile")
    pr.add_argument("--bench", action="store_true", help="also measure throughput")
    b = add("book", cmd_book, "this node's share of the order book")
    b.add_argument("--class", dest="cls", metavar="NAME")
    add("ledger", cmd_ledger, "usage receipts and balance")
    li = add("limits", cmd_limits, "contributor limits (show, or change live with --set)")
    li.add_argument("--set", action="append", type=_env_pair, default=[], metavar="KEY=VALUE",
                    help="e.g. --set cpu_share=0.5 --set allowed_hours=22-07 (empty value: back to config)")
    add("pause", cmd_pause, "contributor: stop taking work, hand running tasks elsewhere")
    add("resume", cmd_resume, "contributor: take work again")
    da = add("dashboard", cmd_dashboard, "print the loopback dashboard URL (with its token)")
    da.add_argument("--open", action="store_true", help="open it in the desktop's web browser")
    add("tray", cmd_tray, "a tray icon: contributing/paused/working/offline, pause/resume, dashboard",
        json_flag=False)
    add("jobs", cmd_jobs, "jobs this node submitted or runs")
    j = add("job", cmd_job, "one job")
    j.add_argument("id")
    lg = add("logs", cmd_logs, "a job's output", json_flag=False)
    lg.add_argument("id")
    lg.add_argument("--follow", "-f", action="store_true")
    c = add("cancel", cmd_cancel, "cancel a job")
    c.add_argument("id")

    ex = add("exec", cmd_exec, "run a command inside a running job's sandbox (exit code = the command's)",
             json_flag=False)
    ex.add_argument("--interactive", "-i", action="store_true", help="forward stdin to the command")
    ex.add_argument("--tty", "-t", action="store_true",
                    help="run it on a pseudo-terminal (implies -i; keys, ^C and window size go through)")
    ex.add_argument("--env", "-e", action="append", default=[], metavar="KEY=VALUE", type=_env_pair)
    ex.add_argument("id", metavar="JOB")
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD")
    sh = add("shell", cmd_shell, "an interactive shell inside a running job's sandbox (on a pseudo-terminal "
             "when ours is one; else commands are read from stdin)", json_flag=False)
    sh.add_argument("--shell", default="/bin/sh", metavar="PATH")
    sh.add_argument("--no-tty", action="store_true", help="no pseudo-terminal even on a terminal")
    sh.add_argument("--env", "-e", action="append", default=[], metavar="KEY=VALUE", type=_env_pair)
    sh.add_argument("id", metavar="JOB")

    def task_flags(sp):
        sp.add_argument("--runtime", choices=RUNTIME_KINDS)
        sp.add_argument("--cpus", type=float, default=1.0)
        sp.add_argument("--memory", type=parse_size, default=256 << 20, metavar="SIZE")
        sp.add_argument("--timeout", type=float, default=None, metavar="SECONDS")
        sp.add_argument("--env", "-e", action="append", default=[], metavar="KEY=VALUE",
                        type=_env_pair, help="environment variable for the task (repeatable)")
        sp.add_argument("artifact", metavar="ARTIFACT")
        sp.add_argument("args", nargs=argparse.REMAINDER, metavar="-- ARGS")

    r = add("run", cmd_run, "place a task on the mesh and stream its output")
    r.add_argument("--max-price", type=float, default=None, metavar="P")
    r.add_argument("--image-ref", metavar="TAG|sha256:DIGEST",
                   help="which image of a layout/archive holding several (a tag or a manifest digest)")
    r.add_argument("--detach", action="store_true")
    r.add_argument("--checkpointable", action="store_true",
                   help="run so the task can migrate (wasm ABI v1, runsc, microvm)")
    r.add_argument("--gpus", type=int, default=0, metavar="N", help="GPUs the task gets (container runtime)")
    r.add_argument("--gpu-class", metavar="CLASS", help="GPU class, e.g. h100, a100, consumer, h100-1g-10gb")
    r.add_argument("--gpu-memory", type=parse_size, metavar="SIZE", help="memory needed on each GPU")
    r.add_argument("--cuda-capability", metavar="X.Y", help="least CUDA compute capability")
    task_flags(r)
    sb = sub.add_parser("sandbox", help="try this host's sandboxes locally, without the mesh")
    sbsub = sb.add_subparsers(dest="sandbox_command", metavar="COMMAND", parser_class=_Parser)
    sbr = sbsub.add_parser("run", help="run a task in a local sandbox")
    sbr.add_argument("--json", action="store_true", help="print the exit status as JSON")
    task_flags(sbr)
    sbr.set_defaults(fn=cmd_sandbox_run)
    dm = add("demo", cmd_demo, "throwaway local mesh of real daemons placing real tasks",
             json_flag=False)
    dm.add_argument("--keep", action="store_true", help="leave the demo homes on disk")
    si = add("sim", cmd_sim, "simulate a spot/on-demand market with the daemon's own decision code (no daemon)")
    si.add_argument("--scenario", action="append", required=True, metavar="NAME|FILE",
                    help="built-in scenario name or TOML file (repeat for side by side)")
    si.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    si.add_argument("--seeds", type=int, default=1, metavar="N", help="Monte Carlo: N seeds from --seed")
    si.add_argument("--variant", action="append", metavar="NAME", help="run only these variants (+ baseline)")
    si.add_argument("--png", metavar="PATH", help="write a figure: cost per variant, cost over time")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.home is None:
            args.home = default_home(client=args.command not in ("daemon", "init"))
        if getattr(args, "args", None) and args.args[0] == "--":
            args.args = args.args[1:]
        if not getattr(args, "fn", None):
            raise CliError("synord: missing command (see `synord --help`)", EXIT_USAGE)
        return args.fn(args)
    except CliError as exc:
        print(str(exc) if str(exc).startswith("synord") else f"synord: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:
        from .client import ClientError
        if isinstance(exc, ClientError):
            print(f"synord: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
