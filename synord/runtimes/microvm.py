"""MicroVM sandbox: a real Linux guest per task.

VMM: Firecracker when its binary is on PATH and KVM is usable (that code path
is untested here: Firecracker is in no registry we can reach); otherwise QEMU
``-M microvm`` with KVM, or TCG software emulation when /dev/kvm cannot boot
a stock kernel (``SYNORD_MICROVM_ACCEL=tcg|kvm|auto``, default auto).

Guest (built by ``packaging/guest/build.sh``, found in ``SYNORD_GUEST_DIR``
or ``packaging/guest/out``): an uncompressed ``vmlinux`` and ``base.cpio``
holding our static ``/init``.  prepare() appends one cpio per task: the OCI
image unpacked under ``/rootfs`` plus ``/synord/{argv,env,workdir,stdin}``.

Output: the init frames stdout, stderr and the exit code on the serial
console (see packaging/guest/init.c); `ConsoleParser` splits them apart.
The guest has no network device at all (``-nodefaults``, no ``-netdev``).

Checkpoint (QEMU only): QMP ``stop`` + ``migrate exec:zstd -1 > vm.state.zst``
(``cat > vm.state`` without zstd: 4x larger); the checkpoint directory holds
the state, the exact initramfs, and meta.json (the
machine arguments and the console bytes of a frame cut in half).  Restore
starts QEMU with identical machine arguments, ``-S -incoming``, then ``cont``.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path

import psutil
import trio

from .base import (Availability, CheckpointInfo, CheckpointUnsupported, ExecUnsupported, ExitStatus, LogBuffer, LogChunk,
                   Runtime, RuntimeError_, SpecError, SupervisedSandbox, TaskSpec, TerminalSize, Unavailable, Usage,
                   OUTPUT_OFFSETS_FILE, child_env)
from .digests import checkpoint_digest, sha256_file, verify_artifact
from .anchored import AnchoredProcess, spawn
from .cpio import CpioWriter
from .guest_exec import ExecChannel, FrameSplitter, encode_frame
from .qmp import QMP, QMPError
from . import vfio

log = logging.getLogger(__name__)


def _default_guest_dir() -> Path:
    """A checkout's build output (packaging/guest/out), else the installed venv's data dir,
    <venv>/share/synord/guest, which packaging/install-service.sh fills."""
    for p in Path(__file__).resolve().parents:
        if (p / "packaging" / "guest" / "build.sh").is_file():
            return p / "packaging" / "guest" / "out"
    return Path(sys.prefix) / "share" / "synord" / "guest"


DEFAULT_GUEST_DIR = _default_guest_dir()
MIN_MEMORY_MIB = 128
KILLED_CODE = 137  # what a shell reports for a SIGKILLed task
NO_EXIT_CODE = -1  # the guest never reported an exit code
CHECKPOINT_VERSION = 1
RESTORE_TIMEOUT_S = 60.0
MIGRATE_TIMEOUT_S = 120.0
_STDERR_KEEP = 64 * 1024
# A PCI bus id as sysfs names it: it goes into a QEMU option string, so nothing else may.
_BUS_ID = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


# --------------------------------------------------------------------------
# Console framing (the host half of packaging/guest/init.c)


class ConsoleParser:
    """Splits the serial console into task stdout/stderr, the exit code and noise."""

    def __init__(self, pending: bytes = b"") -> None:
        self._frames = FrameSplitter(pending)
        self.exit_code: int | None = None
        self.reason: str | None = None  # the guest's own diagnosis, e.g. "oom"
        self.noise = bytearray()  # kernel messages outside frames (kept for diagnostics)

    @property
    def pending(self) -> bytes:
        """Unparsed bytes: a partial frame (saved with a checkpoint)."""
        return self._frames.pending

    def feed(self, data: bytes) -> list[LogChunk]:
        out: list[LogChunk] = []
        for item in self._frames.feed(data):
            if isinstance(item, bytes):
                self._noise(item)
                continue
            kind, payload = item
            if kind == b"o":
                out.append(LogChunk("stdout", payload))
            elif kind == b"e":
                out.append(LogChunk("stderr", payload))
            elif kind == b"x":
                try:
                    self.exit_code = int(payload)
                except ValueError:
                    self._noise(payload)
            elif kind == b"r":
                self.reason = payload.decode("ascii", "replace")
            else:
                self._noise(encode_frame(kind, payload))
        return out

    def _noise(self, data: bytes) -> None:
        if len(self.noise) < _STDERR_KEEP:
            self.noise += data[:_STDERR_KEEP - len(self.noise)]


# --------------------------------------------------------------------------
# Host facts


def _accel_mode() -> str:
    mode = os.environ.get("SYNORD_MICROVM_ACCEL", "auto").strip().lower()
    if mode not in ("auto", "kvm", "tcg"):
        raise Unavailable(f"SYNORD_MICROVM_ACCEL={mode!r}: expected tcg, kvm or auto")
    return mode


def kvm_usable() -> tuple[bool, str]:
    """Whether /dev/kvm can run a stock guest kernel (a quick, conservative guess)."""
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm not accessible"
    # PVM (kvm_pvm without kvm_intel/kvm_amd) is a paravirtual KVM that stock
    # guest kernels cannot boot on.
    mods = set(os.listdir("/sys/module")) if os.path.isdir("/sys/module") else set()
    if "kvm_pvm" in mods and not mods & {"kvm_intel", "kvm_amd"}:
        return False, "/dev/kvm is PVM"
    return True, ""


def host_tsc_khz() -> int:
    """The host TSC frequency; given to the guest (tsc_early_khz) so TCG boots never hang calibrating."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return 2_000_000


def _peak_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def guest_kernel_identity(kernel: Path) -> tuple[str, str]:
    """(sha256, version) of the guest kernel; build.sh's manifest saves hashing 66 MB."""
    manifest = kernel.parent / "manifest.json"
    try:
        if manifest.stat().st_mtime >= kernel.stat().st_mtime:
            info = json.loads(manifest.read_text())
            return str(info["vmlinux_sha256"]), str(info.get("kernel_version", ""))
    except (OSError, ValueError, KeyError):
        pass
    return sha256_file(kernel), ""


# --------------------------------------------------------------------------
# Machine description: everything a restore must repeat exactly


class Machine:
    """``exec_channel``: a second UART (ttyS1) on a Unix socket for `synord exec`;
    part of the machine, so a restore repeats whatever the checkpoint had."""

    def __init__(self, *, vmm: str, binary: str, accel: str, kernel: Path, initramfs: Path,
                 mem_mib: int, smp: int, cmdline: str, exec_channel: bool = False,
                 vfio: list[dict] | None = None) -> None:
        self.vmm, self.binary, self.accel = vmm, binary, accel
        self.kernel, self.initramfs = Path(kernel), Path(initramfs)
        self.mem_mib, self.smp, self.cmdline = mem_mib, smp, cmdline
        self.exec_channel = exec_channel and vmm == "qemu"
        self.vfio = list(vfio or [])  # GPUs passed through ({pci_bus_id, iommu_group}): QEMU only

    def qemu_argv(self, qmp_socket: Path | None, incoming: str | None = None,
                  exec_socket: Path | None = None) -> list[str]:
        """``incoming``: a shell command that writes the saved state to stdout."""
        accel = "kvm" if self.accel == "kvm" else "tcg,tb-size=64"
        # A passed-through GPU needs the microvm machine's PCIe host bridge (synord.runtimes.vfio).
        argv = [self.binary, "-M", f"microvm,{vfio.MICROVM_MACHINE_OPTS}" if self.vfio else "microvm",
                "-accel", accel]
        if self.accel == "kvm":
            argv += ["-cpu", "host"]
        argv += ["-m", str(self.mem_mib), "-smp", str(self.smp),
                 "-nographic", "-no-reboot", "-nodefaults", "-no-user-config",
                 "-serial", "stdio",
                 "-kernel", str(self.kernel), "-initrd", str(self.initramfs),
                 "-append", self.cmdline]
        if qmp_socket is not None:
            argv += ["-qmp", f"unix:{qmp_socket},server=on,wait=off"]
        if self.exec_channel:
            if exec_socket is None:
                raise ValueError("this machine has an exec channel: give its socket")
            argv += ["-chardev", f"socket,id=exec,path={exec_socket},server=on,wait=off",
                     "-device", "isa-serial,chardev=exec,iobase=0x2f8,irq=3"]
        argv += vfio.qemu_args(self.vfio)
        if incoming is not None:
            argv += ["-S", "-incoming", f"exec:{incoming}"]
        return argv

    def firecracker_config(self) -> dict:
        return {"boot-source": {"kernel_image_path": str(self.kernel),
                                "initrd_path": str(self.initramfs),
                                "boot_args": self.cmdline},
                "drives": [],
                "machine-config": {"vcpu_count": self.smp, "mem_size_mib": self.mem_mib},
                "network-interfaces": []}

    def to_json(self) -> dict:
        return {"vmm": self.vmm, "accel": self.accel, "mem_mib": self.mem_mib, "smp": self.smp,
                "cmdline": self.cmdline, "exec_channel": self.exec_channel}


def kernel_cmdline(vmm: str, accel: str = "tcg") -> str:
    base = "console=ttyS0 quiet loglevel=1 panic=-1"
    if vmm == "firecracker":
        return base + " reboot=k pci=off synord.exit=reboot"
    if accel == "tcg":
        # without these ~15 % of TCG boots hang calibrating the TSC
        base += f" tsc_early_khz={host_tsc_khz()} tsc=reliable"
    return base


# --------------------------------------------------------------------------
# Runtime


class MicroVMRuntime(Runtime):
    kind = "microvm"
    supports_checkpoint = True  # with QEMU; Firecracker runs refuse

    def __init__(self, guest_dir: Path | None = None) -> None:
        env_dir = os.environ.get("SYNORD_GUEST_DIR")
        self.guest_dir = Path(guest_dir or env_dir or DEFAULT_GUEST_DIR)

    @property
    def kernel(self) -> Path:
        return self.guest_dir / "vmlinux"

    @property
    def base_cpio(self) -> Path:
        return self.guest_dir / "base.cpio"

    def _select(self, pci: bool = False) -> tuple[str, str, str, str]:
        """(vmm, binary, accel, note) or raise Unavailable. ``pci``: the machine takes a
        PCI device (VFIO), which Firecracker cannot: QEMU."""
        if not (self.kernel.is_file() and self.base_cpio.is_file()):
            raise Unavailable("guest kernel not built: run packaging/guest/build.sh"
                              f" (looked in {self.guest_dir})")
        mode = _accel_mode()
        kvm_ok, kvm_why = kvm_usable()
        fc = shutil.which("firecracker")
        if fc and kvm_ok and mode != "tcg" and os.environ.get("SYNORD_MICROVM_VMM", "") != "qemu" and not pci:
            return "firecracker", fc, "kvm", ""
        qemu = shutil.which("qemu-system-x86_64")
        if not qemu:
            raise Unavailable("neither firecracker (with usable KVM) nor qemu-system-x86_64 found"
                              " (apt-get install qemu-system-x86)")
        if mode == "kvm":
            if not kvm_ok:
                raise Unavailable(f"SYNORD_MICROVM_ACCEL=kvm but KVM is unusable: {kvm_why}")
            return "qemu", qemu, "kvm", ""
        if mode == "auto" and kvm_ok:
            return "qemu", qemu, "kvm", ""
        return "qemu", qemu, "tcg", "no usable /dev/kvm: software emulation only"

    def available(self) -> Availability:
        try:
            vmm, _, accel, note = self._select()
        except Unavailable as e:
            return Availability(False, str(e))
        return Availability(True, note or f"{vmm} with {accel}")

    def passthrough_unavailable(self) -> str | None:
        """Why a GPU cannot be passed through here (no QEMU: Firecracker has no PCI), or None."""
        try:
            self._select(pci=True)
        except Unavailable as exc:
            return str(exc)
        return None

    async def prepare(self, spec: TaskSpec) -> "MicroVMSandbox":
        gpus = _vfio_devices(spec)
        vmm, binary, accel, _ = self._select(pci=bool(gpus))
        if spec.network:
            raise SpecError("microvm tasks get no network")
        if spec.mounts:
            raise SpecError("microvm tasks cannot mount host paths (the guest has no shared fs)")
        if gpus and (why := await trio.to_thread.run_sync(vfio.check_openable, gpus)):
            raise Unavailable(why)
        verify_artifact(spec.artifact, spec.sha256)
        workdir, owned = _workdir(spec)
        try:
            initramfs = workdir / "initramfs.cpio"
            await trio.to_thread.run_sync(self._build_initramfs, spec, workdir, initramfs)
            mem_mib = max(MIN_MEMORY_MIB, math.ceil(spec.limits.memory_bytes / (1 << 20)))
            if initramfs.stat().st_size * 2 + (64 << 20) > mem_mib << 20:
                raise SpecError(f"image too large for {mem_mib} MiB of guest memory "
                                f"(initramfs {initramfs.stat().st_size >> 20} MiB is held twice)")
        except BaseException:
            if owned:
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        machine = Machine(vmm=vmm, binary=binary, accel=accel, kernel=self.kernel,
                          initramfs=initramfs, mem_mib=mem_mib,
                          smp=max(1, math.ceil(spec.limits.cpus)), cmdline=kernel_cmdline(vmm, accel),
                          exec_channel=True, vfio=gpus)
        return MicroVMSandbox(spec, machine, workdir, owned)

    def _build_initramfs(self, spec: TaskSpec, workdir: Path, dest: Path) -> None:
        rootfs = workdir / "rootfs"
        if rootfs.exists():
            shutil.rmtree(rootfs)
        conf = _unpack_image(Path(spec.artifact), rootfs)
        argv = list(conf.entrypoint or []) + list(spec.args or conf.cmd or [])
        if not argv:
            raise SpecError("the image has no entrypoint or cmd, and the task gives no args")
        env = conf.env_dict()
        env.update(spec.env)
        for k, v in env.items():
            if "\0" in k or "\0" in v or "=" in k or not k:
                raise SpecError(f"invalid environment variable {k!r}")
        if any("\0" in a for a in argv):
            raise SpecError("arguments cannot contain NUL bytes")
        tmp = dest.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            with open(self.base_cpio, "rb") as base:
                shutil.copyfileobj(base, out)
            w = CpioWriter(out)
            w.add_tree(rootfs, "rootfs")
            w.add_bytes("synord/argv", b"".join(a.encode() + b"\0" for a in argv))
            w.add_bytes("synord/env", b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()))
            w.add_bytes("synord/workdir", (conf.workdir or "/").encode())
            if spec.stdin is not None:
                w.add_bytes("synord/stdin", spec.stdin)
            w.close()
        os.replace(tmp, dest)
        shutil.rmtree(rootfs, ignore_errors=True)  # everything now lives in the cpio

    async def restore(self, spec: TaskSpec, checkpoint: Path) -> "MicroVMSandbox":
        vmm, binary, accel, _ = self._select()
        checkpoint = Path(checkpoint)
        try:
            meta = json.loads((checkpoint / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise SpecError(f"{checkpoint}: not a microvm checkpoint ({e})") from None
        if meta.get("version") != CHECKPOINT_VERSION or meta.get("kind") != "microvm":
            raise SpecError(f"{checkpoint}: unsupported checkpoint version {meta.get('version')!r}")
        try:
            m = meta["machine"]
            mem_mib, smp, cmdline = int(m["mem_mib"]), int(m["smp"]), str(m["cmdline"])
        except (KeyError, TypeError, ValueError) as e:
            raise SpecError(f"checkpoint meta.json is malformed ({e})") from None
        # a checkpoint may come from another peer: it gets no more than the spec grants
        allowed_mib = max(MIN_MEMORY_MIB, math.ceil(spec.limits.memory_bytes / (1 << 20)))
        if mem_mib < MIN_MEMORY_MIB or smp < 1:
            raise SpecError(f"checkpoint meta.json: impossible machine ({mem_mib} MiB, {smp} vCPUs)")
        if mem_mib > allowed_mib or smp > max(1, math.ceil(spec.limits.cpus)):
            raise SpecError(f"checkpoint needs {mem_mib} MiB and {smp} vCPUs; the task's limits "
                            f"allow {allowed_mib} MiB and {spec.limits.cpus:g} CPUs")
        state = checkpoint / str(meta.get("state_file", "vm.state"))
        initramfs = checkpoint / "initramfs.cpio"
        if state.parent != checkpoint:
            raise SpecError("checkpoint meta.json names a state file outside the checkpoint")
        for p in (state, initramfs):
            if not p.is_file():
                raise SpecError(f"checkpoint is missing {p.name}")
        compression = meta.get("state_compression")
        if compression == "zstd":
            if not shutil.which("zstd"):
                raise Unavailable("restoring this checkpoint needs zstd (apt-get install zstd)")
            incoming = f"zstd -dcq {shlex.quote(str(state))}"
        elif compression is None:
            incoming = f"cat {shlex.quote(str(state))}"
        else:
            raise SpecError(f"unknown checkpoint compression {compression!r}")
        if vmm != "qemu":
            raise CheckpointUnsupported("restoring needs QEMU (set SYNORD_MICROVM_VMM=qemu)")
        kernel_sha, _ = await trio.to_thread.run_sync(guest_kernel_identity, self.kernel)
        if kernel_sha != meta.get("kernel_sha256"):
            raise SpecError("checkpoint was made with another guest kernel "
                            f"({meta.get('kernel_version', '?')}); rebuild or use the same guest")
        if await trio.to_thread.run_sync(sha256_file, initramfs) != meta.get("initramfs_sha256"):
            raise SpecError("checkpoint initramfs does not match its digest")
        if m.get("accel") != accel:
            # TCG and KVM CPU states are not interchangeable; use what made it if possible.
            log.warning("checkpoint made with %s, restoring with %s", m.get("accel"), accel)
        workdir, owned = _workdir(spec)
        machine = Machine(vmm="qemu", binary=binary, accel=accel, kernel=self.kernel,
                          initramfs=initramfs, mem_mib=mem_mib, smp=smp, cmdline=cmdline,
                          exec_channel=m.get("exec_channel") is True)
        try:
            pending = base64.b64decode(meta.get("console_pending", ""), validate=True)
        except (ValueError, TypeError):
            raise SpecError("checkpoint meta.json: console_pending is not base64") from None
        return MicroVMSandbox(spec, machine, workdir, owned, incoming=incoming,
                              console_pending=pending)


def _vfio_devices(spec: TaskSpec) -> list[dict]:
    """The GPUs ``spec`` passes through; a microVM takes devices only by VFIO."""
    if not spec.devices:
        return []
    if set(spec.devices) != {"vfio"} or not isinstance(spec.devices["vfio"], list):
        raise SpecError("a microVM takes devices only by VFIO passthrough (no CDI edits)")
    for d in spec.devices["vfio"]:
        if not (isinstance(d, dict) and _BUS_ID.match(str(d.get("pci_bus_id")))
                and str(d.get("iommu_group")).isdigit()):
            raise SpecError("a VFIO device is {pci_bus_id, iommu_group}")
    return [dict(d) for d in spec.devices["vfio"]]


def _workdir(spec: TaskSpec) -> tuple[Path, bool]:
    if spec.workdir is not None:
        Path(spec.workdir).mkdir(parents=True, exist_ok=True)
        return Path(spec.workdir), False
    return Path(tempfile.mkdtemp(prefix="synord-microvm-")), True


def _unpack_image(artifact: Path, rootfs: Path):
    """The one place that knows images are OCI (layout dir or oci-archive)."""
    from .oci import unpack_image
    return unpack_image(artifact, rootfs)


# --------------------------------------------------------------------------
# Sandbox


class MicroVMSandbox(SupervisedSandbox):
    supports_checkpoint = True

    def __init__(self, spec: TaskSpec, machine: Machine, workdir: Path, owns_workdir: bool,
                 incoming: str | None = None, console_pending: bytes = b"") -> None:
        self.spec, self.machine, self.workdir = spec, machine, Path(workdir)
        self._owns_workdir = owns_workdir
        self._incoming = incoming
        self._parser = ConsoleParser(console_pending)
        self._sock_dir: Path | None = None  # our own, when the workdir path is too long
        sock_dir = self.workdir
        if len(str(self.workdir / "qmp.sock")) > 100:  # sun_path holds 108 bytes
            self._sock_dir = sock_dir = Path(tempfile.mkdtemp(prefix="synord-vm-"))
        self._qmp_path = sock_dir / "qmp.sock"
        self._exec_path = sock_dir / "exec.sock"
        self._exec = ExecChannel(self._exec_path) if machine.exec_channel else None
        self._proc: AnchoredProcess | None = None
        self._qmp: QMP | None = None
        self._qmp_lock = trio.Lock()
        self._output = LogBuffer()
        self._done = trio.Event()
        self._console_eof = trio.Event()
        self._status: ExitStatus | None = None
        self._stop_reason: str | None = None  # set when we end the VM ourselves
        self._stderr = bytearray()
        self._cpu_s = 0.0
        self._peak = 0
        self._started_at = 0.0
        self.diagnostics = b""  # kernel console noise + QEMU stderr after exit

    # -- lifecycle ---------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        if self._proc is not None:
            raise RuntimeError_("sandbox already started")
        m = self.machine
        if m.vmm == "firecracker":
            cfg = self.workdir / "firecracker.json"
            cfg.write_text(json.dumps(m.firecracker_config()))
            argv = [m.binary, "--no-api", "--config-file", str(cfg)]
        else:
            self._qmp_path.unlink(missing_ok=True)
            self._exec_path.unlink(missing_ok=True)
            argv = m.qemu_argv(self._qmp_path, self._incoming, self._exec_path)
        self._started_at = trio.current_time()
        # dies with the daemon; its anchor thread lives in the caller's nursery
        try:
            self._proc = await spawn(nursery, argv, env=child_env(), cwd=str(self.workdir))
        except OSError as e:
            raise Unavailable(f"cannot start {argv[0]}: {e.strerror or e}") from None
        if self._incoming is not None:
            try:
                await self._resume_incoming()
            except BaseException:
                await self._hard_kill()
                with trio.CancelScope(shield=True):
                    await self._proc.aclose()
                # wait()/kill() must not hang on a sandbox that never ran
                self._status = ExitStatus(NO_EXIT_CODE, Usage(), "restore_failed")
                self._done.set()
                self._output.close()
                if self._owns_workdir:
                    shutil.rmtree(self.workdir, ignore_errors=True)
                raise
        nursery.start_soon(self._supervise)

    async def _resume_incoming(self) -> None:
        """Wait until QEMU loaded the state (paused), then run; never hang on a bad state."""
        assert self._proc is not None
        failure = None
        with trio.move_on_after(RESTORE_TIMEOUT_S) as cs:
            async with trio.open_nursery() as n:
                # QEMU exits with an error when the state does not load.
                async def watch_exit() -> None:
                    nonlocal failure
                    await self._proc.wait_exited()
                    failure = "QEMU exited while loading the checkpoint"
                    n.cancel_scope.cancel()

                async def load() -> None:
                    nonlocal failure
                    try:
                        qmp = await self._get_qmp()
                        while True:
                            st = (await qmp.execute("query-status"))["status"]
                            if st in ("paused", "postmigrate"):
                                break
                            if st not in ("inmigrate", "prelaunch"):
                                failure = f"unexpected VM state {st!r} after loading"
                                break
                            await trio.sleep(0.02)
                        if failure is None:
                            await qmp.execute("cont")
                    except QMPError as e:
                        failure = f"QMP: {e}"
                    n.cancel_scope.cancel()
                n.start_soon(watch_exit)
                n.start_soon(load)
        if cs.cancelled_caught:
            failure = f"checkpoint did not load within {RESTORE_TIMEOUT_S:.0f} s"
        if failure:
            err = b""
            with trio.move_on_after(1):
                err = await self._proc.stderr.receive_some(4096)
            detail = err.decode(errors="replace").strip().splitlines()
            raise SpecError(f"cannot restore microvm: {failure}"
                            + (f": {detail[-1]}" if detail else ""))

    async def _get_qmp(self) -> QMP:
        if self.machine.vmm != "qemu":
            raise CheckpointUnsupported("only QEMU microVMs have a control socket")
        if self._qmp is None:
            self._qmp = await QMP.connect(self._qmp_path, timeout=30)
        return self._qmp

    async def _supervise(self) -> None:
        proc = self._proc
        assert proc is not None
        timeout = self.spec.limits.timeout_s
        try:
            async with trio.open_nursery() as n:
                n.start_soon(self._read_console, proc.stdout)
                n.start_soon(self._read_stderr, proc.stderr)
                n.start_soon(self._sample_usage)
                if self._exec is not None:
                    n.start_soon(self._exec.run)
                deadline = (self._started_at + timeout) if timeout else float("inf")
                with trio.move_on_at(deadline) as cs:
                    await proc.wait_exited()
                if cs.cancelled_caught and self._stop_reason is None:
                    self._stop_reason = "timeout"
                    self._signal_kill()
                    await proc.wait_exited()
                self._sample_once()  # a zombie still reports its CPU time
                await proc.wait()
                with trio.move_on_after(5):  # the pipes close when QEMU is gone
                    await self._console_eof.wait()
                n.cancel_scope.cancel()
        finally:
            if proc.returncode is None:  # cancelled from outside: never leave QEMU behind
                if self._stop_reason is None:
                    self._stop_reason = "killed"
                self._signal_kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
            with trio.CancelScope(shield=True):
                await proc.aclose()
                if self._qmp is not None:
                    await self._qmp.aclose()
            self._finish()

    def _finish(self) -> None:
        usage = Usage(cpu_s=round(self._cpu_s, 3), peak_memory_bytes=self._peak,
                      wall_s=round(trio.current_time() - self._started_at, 3))
        code, reason = self._parser.exit_code, self._stop_reason
        if reason is not None and (code is None or reason == "checkpointed"):
            code = KILLED_CODE if reason in ("timeout", "killed") else NO_EXIT_CODE
        elif code is None:
            reason, code = "guest_crash", NO_EXIT_CODE
        else:
            reason = "oom" if self._parser.reason == "oom" and code != 0 else None
        self.diagnostics = bytes(self._parser.noise) + bytes(self._stderr)
        if reason == "guest_crash":
            log.warning("microvm %s: no exit code from the guest (QEMU rc %s): %s",
                        self.spec.task_id or "?", self._proc.returncode if self._proc else "?",
                        self.diagnostics[-2000:].decode(errors="replace"))
        self._status = ExitStatus(code=code, usage=usage, reason=reason)
        self._done.set()
        self._output.close()
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
        if self._owns_workdir and reason != "checkpointed":
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def _read_console(self, stream) -> None:
        try:
            while data := await stream.receive_some(65536):
                chunks = self._parser.feed(data)
                if chunks:
                    self._output.extend(chunks)
                    await self._output.wait_room()  # a reader far behind: stop reading the console
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._console_eof.set()

    async def _read_stderr(self, stream) -> None:
        try:
            while data := await stream.receive_some(65536):
                if len(self._stderr) < _STDERR_KEEP:
                    self._stderr += data[:_STDERR_KEEP - len(self._stderr)]
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _sample_once(self) -> None:
        assert self._proc is not None
        try:
            t = psutil.Process(self._proc.pid).cpu_times()
            self._cpu_s = max(self._cpu_s, t.user + t.system)
        except psutil.Error:
            pass
        self._peak = max(self._peak, _peak_rss(self._proc.pid))

    async def _sample_usage(self) -> None:
        while True:
            self._sample_once()
            await trio.sleep(0.1)

    def _signal_kill(self) -> None:
        if self._proc is not None:
            self._proc.kill_group()  # QEMU and any `cat` it spawned for migration

    async def _hard_kill(self) -> None:
        self._signal_kill()
        if self._proc is not None:
            with trio.CancelScope(shield=True):
                await self._proc.wait()

    # -- the Sandbox interface ---------------------------------------------

    def _has_started(self) -> bool:
        return self._proc is not None

    async def kill(self) -> None:
        if self._proc is None:
            if self._owns_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            return
        if not self._done.is_set():
            if self._stop_reason is None:
                self._stop_reason = "killed"
            self._signal_kill()
            with trio.CancelScope(shield=True):
                await self._done.wait()

    supports_exec = True

    @asynccontextmanager
    async def exec(self, argv: list[str], env: dict[str, str] | None = None,
                   tty: TerminalSize | None = None):
        """A command in the guest beside the task, over the exec channel: the
        task's root, working directory and environment (``env`` over it); with
        ``tty``, on a pseudo-terminal of the guest's."""
        if self._exec is None:
            raise ExecUnsupported("exec into a microVM needs QEMU's exec channel "
                                  "(Firecracker guests and checkpoints made without one have none)")
        if self._proc is None or self._done.is_set():
            raise ExecUnsupported("the microVM is not running")
        proc = await self._exec.open(list(argv), dict(env or {}), tty)
        try:
            yield proc
        finally:
            with trio.CancelScope(shield=True):
                await proc.close_stdin()
                if not proc.ended.is_set():
                    await proc.kill()
                    with trio.move_on_after(5):  # the guest reports the kill as its exit
                        await proc.ended.wait()

    async def checkpoint(self, dest: Path, leave_running: bool = False) -> CheckpointInfo:
        if self._proc is None or self._done.is_set():
            raise CheckpointUnsupported("the microVM is not running")
        if self.machine.vfio:  # QEMU refuses to migrate a VFIO device that has no migration driver
            raise CheckpointUnsupported("a microVM with a passed-through GPU cannot be checkpointed")
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        compression = "zstd" if shutil.which("zstd") else None
        for stale in ("vm.state", "vm.state.zst"):
            (dest / stale).unlink(missing_ok=True)
        if compression == "zstd":
            # zero pages are already skipped; zstd -1 still shrinks the rest ~4x in ~0.3 s
            state = dest / "vm.state.zst"
            save = f"zstd -1 -q -c > {shlex.quote(str(state))}"
        else:
            state = dest / "vm.state"
            save = f"cat > {shlex.quote(str(state))}"
        async with self._qmp_lock:
            qmp = await self._get_qmp()
            try:
                with trio.fail_after(MIGRATE_TIMEOUT_S):
                    await qmp.execute("stop")
                    await qmp.execute("migrate", {"uri": f"exec:{save}"})
                    while True:
                        info = await qmp.execute("query-migrate")
                        st = info.get("status")
                        if st == "completed":
                            break
                        if st in ("failed", "cancelled"):
                            raise RuntimeError_(f"migration {st}: {info.get('error-desc', '')}")
                        await trio.sleep(0.02)
            except (QMPError, trio.TooSlowError) as e:
                raise RuntimeError_(f"microvm checkpoint failed: {e}") from None
            if leave_running:
                # Output QEMU emitted before `stop` must be parsed before we save the
                # parser's half frame; the reader drains the pipe within milliseconds.
                await trio.sleep(0.05)
                pending, emitted = self._parser.pending, dict(self._output.bytes)
                await qmp.execute("cont")
            else:
                self._stop_reason = "checkpointed"
                try:
                    await qmp.execute("quit")
                except QMPError:
                    pass  # QEMU may close the socket before answering
                with trio.move_on_after(10):
                    await self._done.wait()
                if not self._done.is_set():
                    self._signal_kill()
                    await self._done.wait()
                pending, emitted = self._parser.pending, dict(self._output.bytes)
        target = dest / "initramfs.cpio"
        if not (target.exists() and target.samefile(self.machine.initramfs)):
            await trio.to_thread.run_sync(shutil.copyfile, self.machine.initramfs, target)
        kernel_sha, kver = await trio.to_thread.run_sync(guest_kernel_identity, self.machine.kernel)
        initramfs_sha = await trio.to_thread.run_sync(sha256_file, dest / "initramfs.cpio")
        meta = {"version": CHECKPOINT_VERSION, "kind": "microvm",
                "machine": self.machine.to_json(), "kernel_sha256": kernel_sha,
                "kernel_version": kver, "initramfs_sha256": initramfs_sha,
                "state_file": state.name, "state_compression": compression,
                "console_pending": base64.b64encode(pending).decode()}
        (dest / "meta.json").write_text(json.dumps(meta, indent=1))
        # The guest was stopped and its console drained: exactly this much output
        # precedes the snapshot (a half frame is in console_pending; bytes still in
        # the UART are device state and come out again after a restore).
        (dest / OUTPUT_OFFSETS_FILE).write_text(json.dumps(emitted))
        if not leave_running and self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        total, digest = await trio.to_thread.run_sync(checkpoint_digest, dest)
        return CheckpointInfo(path=dest, bytes=total, sha256=digest)
