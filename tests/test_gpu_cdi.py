"""CDI specs (synord.runtimes.cdi) and device injection into real crun containers.

GPU stand-ins are character devices made with mknod under GPU names in a temp
dir: ``nvidia0`` with /dev/kmsg's numbers (1:11, opened write-only: harmless)
and ``nvidia1`` with /dev/fuse's (10:229).  Neither is among the devices a
container gets by default, so opening one inside the task succeeds only if its
device cgroup allows it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from synord.runtimes import cdi

GPU0, GPU1 = "GPU-5f2c7c1e-0000-1111-2222-333344445555", "GPU-5f2c7c1e-0000-1111-2222-666677778888"


def stand_ins(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, (major, minor) in {"nvidia0": (1, 11), "nvidia1": (10, 229), "nvidiactl": (1, 3)}.items():
        try:
            os.mknod(d / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(d / name, 0o666)  # past the umask
        except PermissionError:
            pytest.skip("mknod of character devices needs root")
    return d


def write_spec(cdi_dir: Path, dev: Path, libdir: Path, fmt: str = "yaml", version: str = "0.6.0") -> Path:
    cdi_dir.mkdir(parents=True, exist_ok=True)
    lib = libdir / "libcuda.so.1"
    lib.parent.mkdir(parents=True, exist_ok=True)
    lib.write_text("not really libcuda\n")
    spec = {"cdiVersion": version, "kind": "nvidia.com/gpu",
            "devices": [{"name": GPU0, "containerEdits": {"deviceNodes": [
                            {"path": "/dev/nvidia0", "hostPath": str(dev / "nvidia0")}]}},
                        {"name": GPU1, "containerEdits": {"deviceNodes": [
                            {"path": "/dev/nvidia1", "hostPath": str(dev / "nvidia1")}]}}],
            "containerEdits": {"env": ["NVIDIA_VISIBLE_DEVICES=void"],
                               "deviceNodes": [{"path": "/dev/nvidiactl", "hostPath": str(dev / "nvidiactl")}],
                               "mounts": [{"hostPath": str(lib), "containerPath": "/usr/lib/libcuda.so.1",
                                           "options": ["ro", "nosuid", "nodev", "bind"]}]}}
    path = cdi_dir / f"nvidia.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(spec))
    else:
        import yaml
        path.write_text(yaml.safe_dump(spec))
    return path


# ---- specs: parsing and resolving ------------------------------------------------------------

@pytest.mark.parametrize("fmt,version", [("yaml", "0.5.0"), ("json", "0.6.0"), ("yaml", "0.7.0"), ("json", "0.8.0")])
def test_spec_versions_and_formats_resolve(tmp_path, fmt, version):
    dev = stand_ins(tmp_path / "dev")
    write_spec(tmp_path / "cdi", dev, tmp_path / "lib", fmt, version)
    reg = cdi.Registry([tmp_path / "cdi"])
    assert reg.errors == [] and reg.kinds() == ["nvidia.com/gpu"]
    e = reg.resolve([f"nvidia.com/gpu={GPU1}"])
    # Spec-wide edits once, then the device's own.
    assert [n["path"] for n in e.device_nodes] == ["/dev/nvidiactl", "/dev/nvidia1"]
    assert [m["containerPath"] for m in e.mounts] == ["/usr/lib/libcuda.so.1"]


def test_later_directory_wins_and_bad_files_cost_only_themselves(tmp_path):
    dev = stand_ins(tmp_path / "dev")
    write_spec(tmp_path / "etc", dev, tmp_path / "lib")
    run = tmp_path / "run"
    run.mkdir()
    (run / "nvidia.json").write_text(json.dumps({"cdiVersion": "0.6.0", "kind": "nvidia.com/gpu", "devices": [
        {"name": GPU0, "containerEdits": {"env": ["FROM=run"]}}]}))
    (run / "broken.yaml").write_text("cdiVersion: [unclosed\n")
    (run / "future.json").write_text(json.dumps({"cdiVersion": "9.9.9", "kind": "x.com/y", "devices": []}))
    reg = cdi.Registry([tmp_path / "etc", run])
    assert len(reg.errors) == 2 and any("unsupported cdiVersion" in e for e in reg.errors)
    assert reg.resolve([f"nvidia.com/gpu={GPU0}"]).env == ["FROM=run"]
    assert reg.has(f"nvidia.com/gpu={GPU1}")  # only in /etc/cdi: still there
    # Two specs of one directory naming the same device: a conflict, that device refused.
    (tmp_path / "etc" / "other.json").write_text(json.dumps({"cdiVersion": "0.6.0", "kind": "nvidia.com/gpu",
                                                             "devices": [{"name": GPU1}]}))
    with pytest.raises(cdi.CDIError, match="is defined by"):
        cdi.Registry([tmp_path / "etc", run]).resolve([f"nvidia.com/gpu={GPU1}"])
    with pytest.raises(cdi.CDIError, match="unresolvable"):
        reg.resolve(["nvidia.com/gpu=GPU-nope"])
    with pytest.raises(cdi.CDIError, match="not a qualified"):
        reg.resolve(["../../etc/passwd"])


@pytest.mark.parametrize("bad,msg", [
    ({"cdiVersion": "0.6.0", "kind": "nvidia", "devices": [{"name": "a"}]}, "vendor/class"),
    ({"cdiVersion": "0.6.0", "kind": "a.com/b", "devices": [{"name": "../x"}]}, "bad device name"),
    ({"cdiVersion": "0.6.0", "kind": "a.com/b", "devices": [{"name": "a", "containerEdits": {
        "deviceNodes": [{"path": "dev/x"}]}}]}, "absolute path"),
    ({"cdiVersion": "0.6.0", "kind": "a.com/b", "devices": [{"name": "a", "containerEdits": {
        "mounts": [{"hostPath": "/lib/x", "containerPath": "/../etc/x"}]}}]}, "absolute hostPath"),
    ({"cdiVersion": "0.6.0", "kind": "a.com/b", "devices": [{"name": "a", "containerEdits": {
        "hooks": [{"hookName": "whenever", "path": "/x"}]}}]}, "hookName"),
    ({"cdiVersion": "0.7.0", "kind": "a.com/b", "devices": [{"name": "a", "containerEdits": {
        "intelRdt": {"closID": "x"}}}]}, "intelRdt"),
])
def test_invalid_specs_are_refused(bad, msg):
    with pytest.raises(cdi.CDIError, match=msg):
        cdi.parse_spec(bad)


def test_apply_sets_nodes_cgroup_mounts_env_hooks_gids(tmp_path):
    dev = stand_ins(tmp_path / "dev")
    edits = cdi.Edits()
    edits.add({"deviceNodes": [{"path": "/dev/nvidia0", "hostPath": str(dev / "nvidia0")}],
               "env": ["NVIDIA_VISIBLE_DEVICES=void", "NVIDIA_VISIBLE_DEVICES=" + GPU0],
               "hooks": [{"hookName": "createContainer", "path": "/usr/bin/nvidia-cdi-hook",
                          "args": ["nvidia-cdi-hook", "update-ldcache"]}],
               "additionalGIDs": [0, 44]}, "t")
    conf = {"process": {"env": ["PATH=/bin", "NVIDIA_VISIBLE_DEVICES=all"], "user": {"uid": 0, "gid": 0}},
            "mounts": [], "linux": {"resources": {"devices": [{"allow": False, "access": "rwm"}]}}}
    cdi.apply(conf, edits)
    assert conf["linux"]["devices"] == [{"path": "/dev/nvidia0", "type": "c", "major": 1, "minor": 11,
                                         "fileMode": 0o666}]
    assert conf["linux"]["resources"]["devices"] == [
        {"allow": False, "access": "rwm"}, {"allow": True, "type": "c", "major": 1, "minor": 11, "access": "rwm"}]
    assert [e for e in conf["process"]["env"] if e.startswith("NVIDIA")] == ["NVIDIA_VISIBLE_DEVICES=" + GPU0]
    assert conf["hooks"]["createContainer"][0]["args"] == ["nvidia-cdi-hook", "update-ldcache"]
    assert conf["process"]["user"]["additionalGids"] == [44]


def test_nvidia_spec_generated_from_nvml_and_linker_cache(tmp_path):
    dev = stand_ins(tmp_path / "dev")
    (dev / "nvidia-uvm").write_text("")  # present: mounted as a node
    ldconfig = ("3 libs found in cache `/etc/ld.so.cache'\n"
                "\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1\n"
                "\tlibcuda.so.1 (libc6) => /usr/lib/i386-linux-gnu/libcuda.so.1\n"
                "\tlibnvidia-ml.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1\n"
                "\tlibc.so.6 (libc6,x86-64) => /lib/x86_64-linux-gnu/libc.so.6\n")
    libs = cdi.ldconfig_libs(ldconfig_output=ldconfig)
    assert libs == ["/usr/lib/x86_64-linux-gnu/libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1"]
    spec = cdi.nvidia_spec([{"uuid": GPU0, "minor": 0, "index": 0}, {"uuid": GPU1, "minor": 1, "index": 1},
                            {"uuid": "GPU-gone", "minor": 7}], dev_root=dev, libs=libs, bins_root=tmp_path)
    assert spec.kind == "nvidia.com/gpu" and sorted(spec.devices) == sorted([GPU0, GPU1, "0", "1"])
    reg = cdi.Registry([], extra=[spec])
    e = reg.resolve([f"nvidia.com/gpu={GPU1}"])
    assert [n["path"] for n in e.device_nodes] == ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia1"]
    assert all("ro" in m["options"] for m in e.mounts) and len(e.mounts) == 2
    # No control node on the host: nothing to generate.
    assert cdi.nvidia_spec([{"uuid": GPU0, "minor": 0}], dev_root=tmp_path / "empty", libs=[]) is None


def test_mig_instance_gets_its_parent_and_its_two_capability_nodes(tmp_path):
    dev = stand_ins(tmp_path / "dev")
    (dev / "nvidia-caps").mkdir()
    for n in (66, 67):
        (dev / "nvidia-caps" / f"nvidia-cap{n}").write_text("")
    caps = tmp_path / "proc/driver/nvidia/capabilities/gpu0/mig"
    (caps / "gi7/ci0").mkdir(parents=True)
    (caps / "gi7/access").write_text("DeviceFileMinor: 66\nDeviceFileMode: 292\nDeviceFileModify: 1\n")
    (caps / "gi7/ci0/access").write_text("DeviceFileMinor: 67\nDeviceFileMode: 292\nDeviceFileModify: 1\n")
    mig_a, mig_b = "MIG-aaaa0000-0000-1111-2222-333344445555", "MIG-bbbb0000-0000-1111-2222-333344445555"
    spec = cdi.nvidia_spec([{"uuid": mig_a, "minor": 0, "index": 0, "gi": 7, "ci": 0},
                            {"uuid": mig_b, "minor": 0, "index": 0, "gi": 8, "ci": 0}],  # no caps for gi8
                           dev_root=dev, libs=[], bins_root=tmp_path, proc_root=tmp_path / "proc")
    assert sorted(spec.devices) == [mig_a]  # not by index: that names the whole GPU
    e = cdi.Registry([], extra=[spec]).resolve([f"nvidia.com/gpu={mig_a}"])
    assert [n["path"] for n in e.device_nodes] == [
        "/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia-caps/nvidia-cap66", "/dev/nvidia-caps/nvidia-cap67"]
    assert e.device_nodes[-1]["hostPath"] == str(dev / "nvidia-caps/nvidia-cap67")


def test_dri_spec_for_amd_needs_every_node(tmp_path):
    dev = tmp_path / "dev"
    (dev / "dri").mkdir(parents=True)
    (dev / "kfd").write_text("")
    (dev / "dri/renderD128").write_text("")
    spec = cdi.dri_spec("amd.com/gpu", {"0000-c1-00.0": ["/dev/kfd", "/dev/dri/renderD128"],
                                        "0000-c2-00.0": ["/dev/kfd", "/dev/dri/renderD129"]}, dev_root=dev)
    assert list(spec.devices) == ["0000-c1-00.0"]


# ---- real containers ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def crun_image(tmp_path_factory):
    from synord.runtimes import oci_build as oci
    from synord.runtimes.base import SpecError
    from synord.runtimes.container import ContainerRuntime
    rt = ContainerRuntime()
    av = rt.available()
    if not av.available:
        pytest.skip(f"containers unavailable: {av.reason}")
    try:
        oci.busybox_binary()
    except SpecError as e:
        pytest.skip(str(e))
    d = tmp_path_factory.mktemp("img") / "busybox"
    oci.build_busybox_image(d)
    return rt, d


PROBE_SCRIPT = r"""
ls /dev | grep nvidia | tr '\n' ' '; echo
for n in /dev/nvidia0 /dev/nvidia1 /leak/nvidia0 /leak/nvidia1; do
  if [ -e $n ]; then ( : > $n ) 2>/tmp/e && echo "$n open" || echo "$n $(cat /tmp/e)"; else echo "$n absent"; fi
done
cat /usr/lib/libcuda.so.1; echo "vis=$NVIDIA_VISIBLE_DEVICES cuda=$CUDA_VISIBLE_DEVICES"
"""


async def run_with_devices(rt, image, tmp_path, names, extra_edits=None):
    from synord.runtimes.base import TaskSpec
    from sandbox_helpers import run_to_end
    reg = cdi.Registry([tmp_path / "cdi"])
    edits = reg.resolve(names)
    edits.add(extra_edits, "test")
    uuids = ",".join(n.split("=", 1)[1] for n in names)
    edits.env += [f"NVIDIA_VISIBLE_DEVICES={uuids}", f"CUDA_VISIBLE_DEVICES={uuids}"]
    sb = await rt.prepare(TaskSpec(kind="container", artifact=image, args=["/bin/sh", "-c", PROBE_SCRIPT],
                                   workdir=tmp_path / f"wd{len(names)}", devices=edits.to_json()))
    status, out, err = await run_to_end(sb)
    assert status.code == 0, (out, err)
    return out.decode().splitlines()


async def test_task_gets_exactly_its_devices_and_the_cgroup_denies_others(crun_image, tmp_path):
    rt, image = crun_image
    dev = stand_ins(tmp_path / "dev")
    write_spec(tmp_path / "cdi", dev, tmp_path / "lib")
    # A leak on purpose: the whole stand-in directory mounted without nodev. Only the
    # device cgroup stands between the task and nvidia1 now.
    leak = {"mounts": [{"hostPath": str(dev), "containerPath": "/leak", "options": ["rbind", "ro"]}]}
    lines = await run_with_devices(rt, image, tmp_path, [f"nvidia.com/gpu={GPU0}"], leak)
    assert lines[0].split() == ["nvidia0", "nvidiactl"]
    assert "/dev/nvidia0 open" in lines and "/dev/nvidia1 absent" in lines
    assert "/leak/nvidia0 open" in lines  # same numbers as the allocated node: allowed
    assert any(l.startswith("/leak/nvidia1") and "Operation not permitted" in l for l in lines), lines
    assert "not really libcuda" in lines
    assert f"vis={GPU0} cuda={GPU0}" in lines


async def test_other_allocation_gets_the_other_device(crun_image, tmp_path):
    rt, image = crun_image
    dev = stand_ins(tmp_path / "dev")
    write_spec(tmp_path / "cdi", dev, tmp_path / "lib")
    lines = await run_with_devices(rt, image, tmp_path, [f"nvidia.com/gpu={GPU1}"])
    assert lines[0].split() == ["nvidia1", "nvidiactl"]
    assert "/dev/nvidia0 absent" in lines and "/dev/nvidia1 open" in lines


async def test_devices_refused_for_checkpointable_containers(crun_image, tmp_path):
    from synord.runtimes.base import SpecError, TaskSpec
    rt, image = crun_image
    import shutil
    if not shutil.which("runsc"):
        pytest.skip("runsc not installed")
    with pytest.raises(SpecError, match="gVisor"):
        await rt.prepare(TaskSpec(kind="container", artifact=image, args=["true"], workdir=tmp_path / "w",
                                  checkpointable=True, devices={"env": ["A=1"]}))
