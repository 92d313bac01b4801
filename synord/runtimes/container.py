"""OCI container sandbox: crun (preferred) or runc; gVisor runsc for checkpointable tasks.

prepare: verify the image (every blob against its digest), unpack it with
`synord.runtimes.oci` (cached by manifest digest when the runtime has a cache dir),
write an OCI bundle whose config grants nothing by default: no capabilities,
noNewPrivileges, read-only root, tmpfs /tmp, own pid/net/ipc/uts/mount
namespaces (the net namespace has only ``lo`` unless ``spec.network``),
seccomp, and only the mounts the spec names.

start: ``<rt> run`` in the foreground with stdout/stderr on pipes, inside a
per-task parent cgroup that carries the limits (see `synord.runtimes.cgroups` for
why the parent and not the container's own cgroup).

Theory of teardown: SIGKILL of ``<rt> run`` would leave the container
running, so every stop path goes ``<rt> kill ID KILL`` → ``<rt> delete -f ID``
→ reap the runtime process → kill stragglers and remove the cgroups.

crun 1.8 refuses hybrid cgroups; like the field notes, we run it in a private
mount namespace with ``/sys/fs/cgroup/unified`` unmounted (about +3 ms).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from . import cgroups, oci, reaper, seccomp

from .base import (Availability, CheckpointInfo, ExecUnsupported, ExitStatus, ForwardUnsupported, LogBuffer, LogChunk,
                   Mount, RuntimeError_, TerminalSize,
                   Runtime, SpecError, SupervisedSandbox, TaskSpec, Unavailable, Usage,
                   child_env)
from .digests import checkpoint_digest, verify_artifact
from .exec_plumbing import PipeExecProcess, PtyExecProcess, receive_console_master, set_terminal_size

log = logging.getLogger(__name__)

RUNSC_PIDS_OVERHEAD = 512

# Container state: systemd's RuntimeDirectory= (the service), /run/synord (root), or a per-user dir.
STATE_ROOT = Path(os.environ.get("SYNORD_RUNTIME_STATE") or os.environ.get("RUNTIME_DIRECTORY")
                  or ("/run/synord" if os.geteuid() == 0 else
                      f"{os.environ.get('XDG_RUNTIME_DIR') or tempfile.gettempdir()}/synord-{os.geteuid()}"))
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MASKED = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
          "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
          "/proc/scsi"]
READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def _engine_ok(name: str) -> tuple[str | None, str]:
    path = shutil.which(name)
    if not path:
        return None, f"{name} not installed"
    try:
        subprocess.run([path, "--version"], capture_output=True, timeout=5, check=True, env=child_env())
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{name} does not run ({e})"
    return path, ""


class ContainerRuntime(Runtime):
    kind = "container"
    supports_checkpoint = True  # only for spec.checkpointable tasks (run under runsc)

    def __init__(self, engine: str | None = None, cache_dir: Path | None = None,
                 state_root: Path | None = None):
        """``engine``: force "crun" or "runc" (default: crun, else runc).
        ``cache_dir``: keep unpacked rootfs by image digest (shared read-only)."""
        self._want = engine
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.state_root = Path(state_root) if state_root else STATE_ROOT
        self._engine: tuple[str, str] | None = None  # (name, path)
        self._reason = ""
        # where running containers are registered for the reaper (synord.runtimes.reaper);
        # the daemon sets it, plain library use leaves it off
        self.registry: Path | None = None

    # -- availability -------------------------------------------------------
    def engine(self) -> tuple[str, str]:
        """(name, path) of the OCI runtime used for ordinary tasks; raises Unavailable."""
        if self._engine is None:
            reasons = []
            names = [self._want] if self._want else ["crun", "runc"]
            if os.geteuid() != 0:
                _rootless_check()
                if cgroups.cgroup_mode() == "hybrid" and "crun" in names:
                    # crun 1.8 refuses hybrid cgroups; root hides the unified tree, rootless cannot
                    names.remove("crun")
                    reasons.append("crun refuses hybrid cgroups without root")
            for name in names:
                path, why = _engine_ok(name)
                if path:
                    self._engine = (name, path)
                    break
                reasons.append(why)
            else:
                raise Unavailable("; ".join(reasons))
            if not Path("/sys/fs/cgroup").is_dir():
                self._engine = None
                raise Unavailable("no cgroup filesystem at /sys/fs/cgroup")
        return self._engine

    def available(self) -> Availability:
        try:
            name, _ = self.engine()
        except Unavailable as e:
            return Availability(False, str(e))
        ckpt = self.checkpoint_available()
        extra = "" if ckpt.available else f"; no checkpoint: {ckpt.reason}"
        return Availability(True, f"{name} ({cgroups.cgroup_mode()} cgroups){extra}")

    def checkpoint_available(self) -> Availability:
        if os.geteuid() != 0:  # runsc --rootless checkpoints, but refuses to restore (gVisor 2022)
            return Availability(False, "checkpointable containers (gVisor runsc) need root: "
                                       "runsc --rootless cannot restore")
        return Availability(True, "runsc") if shutil.which("runsc") else Availability(False, "runsc not installed")

    # -- prepare ------------------------------------------------------------
    async def prepare(self, spec: TaskSpec) -> "ContainerSandbox":
        if spec.checkpointable:
            if not (ok := self.checkpoint_available()).available:
                raise Unavailable(f"checkpointable containers: {ok.reason}")
            engine = ("runsc", shutil.which("runsc"))
        else:
            engine = self.engine()
        return await trio.to_thread.run_sync(self._prepare_sync, spec, engine)

    def _prepare_sync(self, spec: TaskSpec, engine: tuple[str, str]) -> "ContainerSandbox":
        verify_artifact(spec.artifact, spec.sha256)
        artifact = Path(spec.artifact)
        conf, _, _ = oci.read_image(artifact)  # verifies every blob before anything else
        if artifact.is_dir() and spec.sha256 and conf.digest != "sha256:" + spec.sha256.removeprefix("sha256:"):
            raise SpecError(f"image manifest digest {conf.digest} does not match the expected {spec.sha256}")
        own_workdir = spec.workdir is None
        workdir = Path(spec.workdir) if spec.workdir else Path(tempfile.mkdtemp(prefix="synord-ctr-"))
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            rootfs = self._rootfs(artifact, conf, workdir)
            args = conf.entrypoint + (list(spec.args) if spec.args else conf.cmd)
            if not args:
                raise SpecError("image has neither Entrypoint nor Cmd and the task gives no args")
            for m in spec.mounts:
                if not Path(m.host).exists():
                    raise SpecError(f"mount source {m.host} does not exist")
                if not m.guest.startswith("/") or ".." in m.guest.split("/"):
                    raise SpecError(f"mount target {m.guest!r} must be an absolute path without '..'")
            sb = ContainerSandbox(self, spec, engine, workdir, rootfs, own_workdir)
            sb.state_dir.mkdir(parents=True, exist_ok=True)
            sb.config = bundle_config(spec, conf, args, rootfs, engine[0], sb.cgroup.container_path)
            if spec.devices:
                _inject_devices(sb.config, spec.devices, rootfs, engine[0])
            (workdir / "config.json").write_text(json.dumps(sb.config))
            for m in spec.mounts:  # mount points must exist before the root turns read-only
                _ensure_mountpoint(rootfs, m)
            return sb
        except BaseException:
            if own_workdir:
                shutil.rmtree(workdir, ignore_errors=True)
            raise

    def _rootfs(self, artifact: Path, conf: oci.ImageConfig, workdir: Path) -> Path:
        if self.cache_dir is None:
            rootfs = workdir / "rootfs"
            if rootfs.exists():
                shutil.rmtree(rootfs)
            oci.unpack_image(artifact, rootfs)
            return rootfs
        cached = self.cache_dir / conf.digest.split(":", 1)[1] / "rootfs"
        if not cached.exists():
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=self.cache_dir))
            try:
                oci.unpack_image(artifact, tmp / "rootfs")
                cached.parent.mkdir(exist_ok=True)
                os.rename(tmp / "rootfs", cached)  # atomic: a half-unpacked rootfs is never visible
            except OSError:
                if not cached.exists():
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return cached

    # -- restore ------------------------------------------------------------
    async def restore(self, spec: TaskSpec, checkpoint: Path) -> "ContainerSandbox":
        if not (Path(checkpoint) / "checkpoint.img").exists():
            raise SpecError(f"{checkpoint} holds no runsc checkpoint (checkpoint.img)")
        spec.checkpointable = True
        sb = await self.prepare(spec)
        sb._restore_from = Path(checkpoint)
        return sb


def _rootless_check() -> None:
    """A non-root daemon runs containers in user namespaces, in its delegated cgroup subtree."""
    try:
        if int(Path("/proc/sys/user/max_user_namespaces").read_text()) == 0:
            raise Unavailable("rootless containers need user namespaces (user.max_user_namespaces is 0)")
    except (OSError, ValueError):
        pass
    try:
        if Path("/proc/sys/kernel/unprivileged_userns_clone").read_text().strip() == "0":
            raise Unavailable("rootless containers need kernel.unprivileged_userns_clone=1")
    except OSError:
        pass
    try:
        cgroups.task_parent()
    except OSError as e:
        raise Unavailable(f"rootless containers: {e}") from None


def rootless_mappings(uid: int, gid: int) -> dict:
    """The task's user (the image's) is the daemon's own uid/gid outside: one id each, no
    setuid helper (newuidmap); the rootfs, unpacked by the daemon, is the task's own."""
    return {"uidMappings": [{"containerID": uid, "hostID": os.geteuid(), "size": 1}],
            "gidMappings": [{"containerID": gid, "hostID": os.getegid(), "size": 1}]}


def bundle_config(spec: TaskSpec, conf: oci.ImageConfig, args: list[str], rootfs: Path,
                  engine: str, cgroups_path: str | None) -> dict:
    env = conf.env_dict()
    env.update(spec.env)
    env.setdefault("PATH", DEFAULT_PATH.split("=", 1)[1])
    uid, gid = _user(conf.user, rootfs)
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=1777", "size=65536k"]},
    ]
    for m in spec.mounts:
        mounts.append({"destination": m.guest, "type": "bind", "source": str(Path(m.host).resolve()),
                       "options": ["rbind", "nosuid", "nodev", "rw" if m.writable else "ro"]})
    rootless = os.geteuid() != 0
    if rootless and spec.network:  # sysfs needs an own net namespace in a user namespace
        mounts = [m if m["destination"] != "/sys" else
                  {"destination": "/sys", "type": "bind", "source": "/sys",
                   "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]} for m in mounts]
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if rootless:
        namespaces.append({"type": "user"})
    if not spec.network:
        namespaces.append({"type": "network"})  # a fresh net namespace: only lo
    if engine != "runsc":
        namespaces.append({"type": "cgroup"})
    linux: dict = {
        "namespaces": namespaces,
        # Limits live on our parent cgroup (synord.runtimes.cgroups); the container's own stays unlimited
        # so that OOM/pids events are recorded where we can still read them after exit.
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "maskedPaths": MASKED,
        "readonlyPaths": READONLY,
    }
    if cgroups_path is not None:
        linux["cgroupsPath"] = cgroups_path
    if rootless:
        linux.update(rootless_mappings(uid, gid))
    if engine != "runsc":  # gVisor's sentry is the syscall filter there
        linux["seccomp"] = seccomp.profile()
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid},
            "args": args,
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": conf.workdir or "/",
            "capabilities": {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": "task",
        "mounts": mounts,
        "linux": linux,
    }


def _inject_devices(config: dict, devices: dict, rootfs: Path, engine: str) -> None:
    """The allocated devices' CDI edits (synord.runtimes.cdi): nodes, device cgroup, mounts, env, hooks."""
    from . import cdi
    if engine == "runsc":
        raise SpecError("devices cannot be given to a checkpointable (gVisor) container")
    try:
        edits = cdi.Edits.from_json(devices)
        cdi.apply(config, edits)
    except cdi.CDIError as exc:
        raise SpecError(f"device injection: {exc}") from None
    for m in edits.mounts:  # targets must exist before the root turns read-only
        if not m["containerPath"].startswith("/") or ".." in m["containerPath"].split("/"):
            raise SpecError(f"device mount target {m['containerPath']!r} must be absolute without '..'")
        _ensure_mountpoint(rootfs, Mount(Path(m["hostPath"]), m["containerPath"]))


def _ensure_mountpoint(rootfs: Path, m) -> None:
    # In-root resolution: an image symlink on the way (e.g. /data -> /) must not make us mkdir on the host.
    target = oci.resolve_in_root(rootfs, m.guest)
    if os.path.islink(target):
        raise SpecError(f"mount target {m.guest} is a symlink in the image")
    if not os.path.lexists(target):
        if Path(m.host).is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()


def _user(user: str, rootfs: Path) -> tuple[int, int]:
    if not user:
        return 0, 0
    name, _, group = user.partition(":")

    def lookup(value: str, table: str) -> int:
        if value.isdigit():
            return int(value)
        try:
            for line in (rootfs / "etc" / table).read_text().splitlines():
                f = line.split(":")
                if len(f) > 2 and f[0] == value:
                    return int(f[2])
        except (OSError, ValueError):
            pass
        raise SpecError(f"image user {user!r}: {value!r} not found in /etc/{table}")

    uid = lookup(name, "passwd")
    if group:
        return uid, lookup(group, "group")
    if name.isdigit():
        return uid, uid
    for line in (rootfs / "etc" / "passwd").read_text().splitlines():
        f = line.split(":")
        if f[0] == name and len(f) > 3:
            return uid, int(f[3])
    return uid, uid


class ContainerSandbox(SupervisedSandbox):
    def __init__(self, rt: ContainerRuntime, spec: TaskSpec, engine: tuple[str, str], workdir: Path,
                 rootfs: Path, own_workdir: bool):
        self.rt, self.spec = rt, spec
        self.engine_name, self.engine_path = engine
        self.workdir, self.rootfs = workdir, rootfs
        self.config: dict = {}  # the bundle's config.json, written by prepare
        self._own_workdir = own_workdir
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in (spec.task_id or ""))[:40]
        self.id = f"synord-{safe + '-' if safe else ''}{uuid.uuid4().hex[:12]}"
        self.cgroup = cgroups.TaskCgroup(self.id)
        self.state_dir = rt.state_root / self.engine_name
        self._restore_from: Path | None = None
        self._seen_running = False  # `<rt> state` said running once (exec need not ask again)
        self._init_pid: int | None = None  # the container's init (its namespaces), once asked
        self._proc: trio.Process | None = None
        self._output = LogBuffer()
        self._done = trio.Event()
        self._status: ExitStatus | None = None
        self._reason: str | None = None
        self._started = False
        self._torn_down = False
        self._t0 = 0.0
        # Read from the parent cgroup at teardown, just before it is removed.
        self._usage: tuple[float, int] = (0.0, 0)
        self._oom = False
        self._pids_hit = False

    @property
    def supports_checkpoint(self) -> bool:  # type: ignore[override]
        return self.engine_name == "runsc"

    # -- commands -----------------------------------------------------------
    def _cmd(self, *args: str) -> list[str]:
        if self.engine_name == "runsc":
            net = "host" if self.spec.network else "none"
            return [self.engine_path, "--root", str(self.state_dir), "--platform=ptrace",
                    f"--network={net}", *args]
        # Rootless, the runtime already runs in the task's cgroup (cgroups.place_argv): crun makes none
        rootless = ["--cgroup-manager=disabled"] if self.engine_name == "crun" and self.cgroup.rootless else []
        base = [self.engine_path, *rootless, "--root", str(self.state_dir), *args]
        if self.engine_name == "crun" and self.cgroup.mode == "hybrid" and not self.cgroup.rootless:
            return ["unshare", "-m", "--propagation", "private", "sh", "-c",
                    'umount /sys/fs/cgroup/unified && exec "$@"', "sh", *base]
        return base

    async def _run_quiet(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        with trio.move_on_after(timeout):
            return await trio.run_process(self._cmd(*args), capture_stdout=True, capture_stderr=True,
                                          check=False, env=child_env())
        return subprocess.CompletedProcess(args, -1, b"", b"timed out")

    # -- lifecycle ----------------------------------------------------------
    async def start(self, nursery: trio.Nursery) -> None:
        if self._started:
            raise RuntimeError("sandbox already started")
        self._started = True
        lim = self.spec.limits
        # cgroupfs writes are in-kernel and sub-millisecond: no thread hop on the start path.
        # Under runsc the task's cgroup also holds gVisor's sentry, gofer and ptrace
        # stubs (dozens of Go threads): give them room above the task's own limit,
        # or the task's fork fails at random once the sentry grows.
        pids = lim.pids + RUNSC_PIDS_OVERHEAD if self.engine_name == "runsc" else lim.pids
        self.cgroup.create(lim.cpus, lim.memory_bytes, pids)
        if self.rt.registry is not None:  # before it exists: a crash right after must not leak it
            await trio.to_thread.run_sync(reaper.register, self.rt.registry, self.id, self._cmd(),
                                          self.engine_name)
        if self._restore_from is not None:
            argv = self._cmd("restore", "--detach", f"--image-path={self._restore_from}",
                             "--bundle", str(self.workdir), self.id)
        else:
            argv = self._cmd("run", "--bundle", str(self.workdir), self.id)
        argv = self.cgroup.place_argv(argv)
        self._t0 = time.monotonic()
        try:
            self._proc = await trio.lowlevel.open_process(
                argv, stdin=subprocess.PIPE if self.spec.stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(),
                start_new_session=True)
        except OSError as e:
            await trio.to_thread.run_sync(self.cgroup.destroy)
            self._unregister()
            raise Unavailable(f"cannot start {self.engine_name}: {e}") from None
        nursery.start_soon(self._supervise)

    def _unregister(self) -> None:
        if self.rt.registry is not None:
            reaper.unregister(self.rt.registry, self.id)

    async def _pump(self, stream, name: str) -> None:
        try:
            while data := await stream.receive_some(65536):
                self._output.append(LogChunk(name, data))
                await self._output.wait_room()  # a reader far behind: stop reading the pipe
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def _feed_stdin(self) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            await self._proc.stdin.send_all(self.spec.stdin or b"")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await self._proc.stdin.aclose()

    async def _wait_code(self) -> int:
        assert self._proc is not None
        code = await self._proc.wait()
        if self._restore_from is None:
            return code
        # `runsc restore --detach` returns once the sandbox runs; its exit status comes from `wait`.
        if code != 0:
            return code
        for _ in range(50):
            res = await trio.run_process(self._cmd("wait", self.id), capture_stdout=True,
                                         capture_stderr=True, check=False, env=child_env())
            try:
                return int(json.loads(res.stdout)["exitStatus"])
            except (ValueError, KeyError, TypeError):
                pass
            # `runsc wait` can fail transiently on a loaded host while the restored
            # sandbox still runs: ask its state, and wait again while it lives.
            st = await trio.run_process(self._cmd("state", self.id), capture_stdout=True,
                                        capture_stderr=True, check=False, env=child_env())
            try:
                status = json.loads(st.stdout).get("status")
            except ValueError:
                status = None
            if status not in ("created", "running", "paused"):
                break
            log.info("runsc wait failed while the sandbox runs; waiting again",
                     extra={"id": self.id, "error": res.stderr.decode(errors="replace")[-200:]})
            await trio.sleep(0.2)
        return 128 + signal.SIGKILL if self._reason else 1

    async def _supervise(self) -> None:
        assert self._proc is not None
        proc = self._proc
        code = -1
        try:
            async with trio.open_nursery() as n:
                n.start_soon(self._pump, proc.stdout, "stdout")
                n.start_soon(self._pump, proc.stderr, "stderr")
                if proc.stdin is not None:
                    n.start_soon(self._feed_stdin)
                timeout = self.spec.limits.timeout_s
                with trio.move_on_after(timeout if timeout is not None else float("inf")) as cs:
                    code = await self._wait_code()
                if cs.cancelled_caught:
                    self._reason = self._reason or "timeout"
                    await self._stop()
                    code = await self._wait_code() if self._restore_from is None else 128 + signal.SIGKILL
                # A detached restore leaves the sandbox holding the pipes: make sure it is gone.
                if self._restore_from is not None:
                    await self._stop()
                n.cancel_scope.deadline = trio.current_time() + 5  # pipes close when the task is gone
        finally:
            with trio.CancelScope(shield=True):
                wall = time.monotonic() - self._t0
                await self._teardown()
                cpu, peak = self._usage
                reason = self._reason
                if reason is None and self._oom and code in (137, -signal.SIGKILL):
                    reason = "oom"
                elif reason is None and code != 0 and self._pids_hit:
                    reason = "pids"
                self._status = ExitStatus(code, Usage(cpu, peak, wall), reason)
                self._output.close()
                self._done.set()

    async def _stop(self) -> None:
        """kill KILL then delete -f: the only reliable way to stop a container."""
        await self._run_quiet("kill", self.id, "KILL")
        await self._run_quiet("delete", "--force" if self.engine_name == "runsc" else "-f", self.id)

    async def _teardown(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        # After a clean `crun/runc run` exit the runtime has already deleted the container;
        # skip the two extra runtime calls (~20 ms) unless its state is still there.
        if self.engine_name == "runsc" or (self.state_dir / self.id).exists() \
                or self._proc is None or self._proc.returncode is None:
            await self._stop()
        if self._proc is not None:
            with trio.move_on_after(5):
                await self._proc.wait()
            if self._proc.returncode is None:  # the runtime itself hangs: last resort
                try:
                    os.killpg(self._proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await self._proc.wait()
        # Read usage and events before the cgroup goes away.
        self._usage = self.cgroup.usage()
        self._oom = self.cgroup.oom_killed()
        self._pids_hit = self.cgroup.pids_limited()
        if not self.cgroup.try_destroy():  # stragglers: kill and retry off the event loop
            await trio.to_thread.run_sync(self.cgroup.destroy)
        self._unregister()
        if self._own_workdir:
            await trio.to_thread.run_sync(shutil.rmtree, self.workdir, True)

    def _has_started(self) -> bool:
        return self._started

    async def kill(self) -> None:
        if not self._started or self._done.is_set():
            if not self._started and self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            return
        self._reason = self._reason or "killed"
        with trio.CancelScope(shield=True):
            await self._stop()
            await self._done.wait()

    # -- checkpoint (runsc only) --------------------------------------------
    async def checkpoint(self, dest: Path, leave_running: bool = False) -> CheckpointInfo:
        from .base import CheckpointUnsupported
        if self.engine_name != "runsc":
            raise CheckpointUnsupported(f"{self.engine_name} containers cannot checkpoint "
                                        "(set checkpointable=True to run under runsc)")
        if not self._started or self._done.is_set():
            raise CheckpointUnsupported("container is not running")
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        args = ["checkpoint", f"--image-path={dest}"]
        if leave_running:
            args.append("--leave-running")
        if not leave_running:
            self._reason = "checkpointed"
        res = await self._run_quiet(*args, self.id, timeout=120)
        if res.returncode != 0:
            if not leave_running:
                self._reason = None
            raise RuntimeError_(f"runsc checkpoint failed: {res.stderr.decode(errors='replace').strip()}")
        total, digest = await trio.to_thread.run_sync(checkpoint_digest, dest)
        return CheckpointInfo(dest, total, digest)

    # -- exec: a command beside the task (synord exec / shell) ----------------
    supports_exec = True

    @asynccontextmanager
    async def exec(self, argv: list[str], env: dict[str, str] | None = None,
                   tty: TerminalSize | None = None):
        """``<rt> exec --process p.json ID``: same user, cwd, no capabilities,
        noNewPrivileges, rlimits (and, from the container, seccomp, namespaces
        and cgroup — so the task's limits cover it) as the task's own process.
        With ``tty`` the command runs on a pseudo-terminal that is its
        controlling terminal; we hold the master (see below for who makes it)."""
        if not argv or not all(isinstance(a, str) and a for a in argv[:1]):
            raise SpecError("exec needs a command")
        if not self._started or self._done.is_set() or self._proc is None \
                or self._proc.returncode is not None or self._torn_down:
            raise ExecUnsupported("the container is not running")
        await self._wait_created()
        process = json.loads(json.dumps(self.config["process"]))  # deep copy
        merged = dict(e.split("=", 1) for e in process.get("env", []) if "=" in e)
        merged.update(env or {})
        process.update(args=list(argv), env=[f"{k}={v}" for k, v in merged.items()], terminal=tty is not None)
        if tty is not None:
            process["consoleSize"] = {"height": tty.rows, "width": tty.cols}
        tag = uuid.uuid4().hex[:12]
        pfile = self.workdir / f"exec-{tag}.json"
        pidfile = self.workdir / f"exec-{tag}.pid"
        pfile.write_text(json.dumps(process))
        pid_flag = "--internal-pid-file" if self.engine_name == "runsc" else "--pid-file"
        # crun makes the terminal and sends us its master over a console socket;
        # runc (which takes one only when detaching) and runsc use the terminal
        # they are given as stdio instead.
        console_dir = Path(tempfile.mkdtemp(prefix="synord-con-")) \
            if tty is not None and self.engine_name == "crun" else None
        console = ["--console-socket", str(console_dir / "sock")] if console_dir else []
        cmd = self._cmd("exec", *console, "--process", str(pfile), f"{pid_flag}={pidfile}", self.id)
        listener = None
        master = slave = -1
        try:
            if console_dir is not None:
                listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
                await listener.bind(str(console_dir / "sock"))
                listener.listen(1)
            elif tty is not None:
                master, slave = os.openpty()
                set_terminal_size(master, tty)
            if tty is None:
                stdio = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
            elif slave >= 0:
                stdio = {"stdin": slave, "stdout": slave, "stderr": slave}
            else:
                stdio = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
            if slave >= 0:
                # runc/runsc forward the signals they get (SIGINT, SIGWINCH) to the
                # command: make the terminal their controlling one, so they get them.
                cmd = ["setsid", "--ctty", *cmd]
            try:
                proc = await trio.lowlevel.open_process(cmd, env=child_env(), start_new_session=slave < 0,
                                                        **stdio)
            except OSError as e:
                raise ExecUnsupported(f"cannot start {self.engine_name} exec: {e}") from None
            finally:
                if slave >= 0:
                    os.close(slave)
            handle: PipeExecProcess | PtyExecProcess
            try:
                if listener is not None:
                    master = await receive_console_master(listener, proc, f"{self.engine_name} exec")
                handle = PtyExecProcess(proc, master) if master >= 0 else PipeExecProcess(proc)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._end_exec(proc, pidfile)
                raise
            master = -1  # the handle owns it now
            async with trio.open_nursery() as n:
                try:
                    n.start_soon(handle.run_output)
                    yield handle
                finally:
                    with trio.CancelScope(shield=True):
                        handle.output.close()  # a caller that stopped reading must not block the pumps
                        await self._end_exec(proc, pidfile)
                        await handle.aclose()
                        n.cancel_scope.deadline = trio.current_time() + 2  # pipes close with the process
        finally:
            if master >= 0:
                os.close(master)
            if listener is not None:
                listener.close()
            if console_dir is not None:
                shutil.rmtree(console_dir, ignore_errors=True)
            pfile.unlink(missing_ok=True)
            pidfile.unlink(missing_ok=True)

    # -- forward: a TCP connection to the task's own loopback (synord forward) --
    def forward_unsupported(self) -> str | None:
        if self.engine_name == "runsc":  # gVisor's own network stack is not the namespace's
            return "forward to gVisor (checkpointable) container tasks is not supported yet"
        return None

    async def connect_port(self, port: int) -> trio.SocketStream:
        """A socket made in the container's net namespace (`synord.runtimes.netns`),
        connected to 127.0.0.1:``port`` there: the container keeps only ``lo``."""
        if why := self.forward_unsupported():
            raise ForwardUnsupported(why)
        if not self._started or self._done.is_set() or self._proc is None \
                or self._proc.returncode is not None or self._torn_down:
            raise ForwardUnsupported("the container is not running")
        try:
            await self._wait_created()
        except ExecUnsupported as exc:
            raise ForwardUnsupported(str(exc)) from None
        if self._init_pid is None:
            res = await self._run_quiet("state", self.id, timeout=5)
            try:
                self._init_pid = int(json.loads(res.stdout)["pid"]) if res.returncode == 0 else None
            except (ValueError, KeyError, TypeError):
                self._init_pid = None
            if not self._init_pid:
                raise ForwardUnsupported("the container is not running")
        from .netns import socket_in_netns
        try:
            raw = await trio.to_thread.run_sync(socket_in_netns, self._init_pid)
        except PermissionError:
            raise ForwardUnsupported("forwarding needs a daemon allowed to enter the task's "
                                     "network namespace (run it as root)") from None
        except OSError as exc:
            raise ForwardUnsupported(f"the container is not running ({exc.strerror or exc})") from None
        if self._done.is_set():  # the pid may have been reused by now: check after
            raw.close()
            raise ForwardUnsupported("the container is not running")
        sock = trio.socket.from_stdlib_socket(raw)
        try:
            await sock.connect(("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)

    async def _wait_created(self, timeout: float = 10.0) -> None:
        """Just after start, ``<rt> run`` may not have created the container yet
        (once seen running, the supervisor's own state says whether it still is)."""
        if self._seen_running:
            return
        with trio.move_on_after(timeout):
            while not self._done.is_set():
                res = await self._run_quiet("state", self.id, timeout=5)
                try:
                    status = json.loads(res.stdout).get("status") if res.returncode == 0 else None
                except (ValueError, AttributeError):
                    status = None
                if status == "running":
                    self._seen_running = True
                    return
                if status == "stopped":
                    break
                await trio.sleep(0.05)
        raise ExecUnsupported("the container is not running")

    async def _end_exec(self, proc: trio.Process, pidfile: Path) -> None:
        """Kill the command inside the container (killing `<rt> exec` alone would orphan it)."""
        if proc.stdin is not None:
            with trio.move_on_after(1):
                try:
                    await proc.stdin.aclose()
                except trio.BrokenResourceError:
                    pass
        if proc.returncode is None:
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                pid = 0
            if pid > 0:
                if self.engine_name == "runsc":
                    await self._run_quiet("kill", f"--pid={pid}", self.id, "KILL", timeout=10)
                else:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            with trio.move_on_after(3):
                await proc.wait()
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()
