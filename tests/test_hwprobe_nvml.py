"""NVIDIA probing against a C stub of libnvidia-ml.so.1 (tests/nvml_stub),
loaded by pynvml's own dlopen("libnvidia-ml.so.1") through LD_LIBRARY_PATH in
a subprocess: no driver, no permission, no GPU, an H100, a card that answers
NotSupported everywhere, an old driver lacking symbols, and no library."""

import ctypes.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

STUB_SRC = Path(__file__).parent / "nvml_stub" / "nvml_stub.c"
REPO = Path(__file__).resolve().parent.parent

PROBE = "import json, synord.hwprobe.nvidia as n; d, r = n.probe_nvidia(); print(json.dumps({'devices': d, 'reason': r}))"


@pytest.fixture(scope="module")
def stub_dirs(tmp_path_factory):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build the NVML stub")
    dirs = {}
    for name, flags in (("current", []), ("old", ["-DOLD_DRIVER"])):
        d = tmp_path_factory.mktemp(f"nvml-{name}")
        subprocess.run([cc, "-shared", "-fPIC", "-O1", *flags, "-o", str(d / "libnvidia-ml.so.1"), str(STUB_SRC)],
                       check=True)
        dirs[name] = d
    return dirs


def run(code: str, libdir: Path | None, mode: str | None = None, log: Path | None = None, args=()):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVML_STUB")}
    env["LD_LIBRARY_PATH"] = str(libdir) if libdir else ""
    if mode:
        env["NVML_STUB_MODE"] = mode
    if log:
        env["NVML_STUB_LOG"] = str(log)
    argv = [sys.executable, "-c", code] if code else [sys.executable, *args]
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    return json.loads(p.stdout)


def test_h100(stub_dirs, tmp_path):
    log = tmp_path / "calls"
    out = run(PROBE, stub_dirs["current"], "h100", log)
    assert out["reason"] is None
    (gpu,) = out["devices"]
    assert gpu["model"] == "NVIDIA H100 80GB HBM3" and gpu["known"] == "H100 SXM5 80GB"
    assert gpu["memory_bytes"] == 85520809984 and gpu["memory_free_bytes"] == 85520809984 - 600 * 2**20
    assert gpu["compute_capability"] == "9.0" and gpu["cuda_cores"] == 16896
    assert gpu["pci_id"] == "10de:2330" and gpu["pci_bus_id"] == "00000000:18:00.0"
    assert (gpu["pcie_gen"], gpu["pcie_width"]) == (5, 16)
    assert gpu["mig_mode"] == {"current": False, "pending": False}
    assert gpu["utilization_percent"] == 7 and gpu["power_w"] == 71.234 and gpu["power_limit_w"] == 700.0
    tp = gpu["throughput"]
    # 16896 cores x 2 x 1980 MHz; 2619 MHz x 2 x 5120 bit / 8.
    assert tp["source"] == "computed" and tp["fp32_gflops"] == 66908.2
    assert tp["bandwidth_gbs"] == 3352.3
    assert tp["fp16_gflops"] == 989400 and tp["measured_fp32_gflops"] is None
    assert log.read_text().split() == ["init", "shutdown"]


def test_every_field_not_supported(stub_dirs, tmp_path):
    log = tmp_path / "calls"
    (gpu,) = run(PROBE, stub_dirs["current"], "notsupported", log)["devices"]
    for field in ("uuid", "pci_bus_id", "compute_capability", "cuda_cores", "pcie_gen", "mig_mode",
                  "utilization_percent", "power_w", "temperature_c"):
        assert gpu[field] is None, field
    # Nothing measurable: the table fills in.
    assert gpu["throughput"]["source"] == "table" and gpu["throughput"]["fp32_gflops"] == 66900
    assert log.read_text().split() == ["init", "shutdown"]


def test_old_driver_without_new_symbols(stub_dirs):
    (gpu,) = run(PROBE, stub_dirs["old"], "h100")["devices"]
    # No nvmlDeviceGetNumGpuCores: SM count (table) x cores per SM for CC 9.0.
    assert gpu["cuda_cores"] == 132 * 128 and gpu["memory_bus_width_bits"] is None
    assert gpu["throughput"]["fp32_gflops"] == 66908.2 and gpu["throughput"]["bandwidth_gbs"] == 3350


@pytest.mark.parametrize("mode,reason", [("nodriver", "Driver Not Loaded"), ("nopermission", "Insufficient"),
                                         ("nogpu", "no GPU")])
def test_no_usable_gpu_is_not_an_error(stub_dirs, mode, reason):
    out = run(PROBE, stub_dirs["current"], mode)
    assert out["devices"] == [] and reason in out["reason"]


def test_library_missing_on_this_machine(tmp_path):
    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("this machine has a real libnvidia-ml")
    out = run(PROBE, tmp_path)
    assert out["devices"] == [] and "NVML unavailable" in out["reason"]


def test_library_that_fails_to_load():
    # Whatever the machine has, make pynvml's dlopen fail the way a missing library does.
    code = ("import pynvml\n"
            "def missing(name): raise OSError(name + ': cannot open shared object file')\n"
            "pynvml.CDLL = missing\n" + PROBE)
    out = run(code, None)
    assert out["devices"] == [] and "NVML unavailable" in out["reason"]


def test_full_probe_with_stub_gpu(stub_dirs):
    prof = run(None, stub_dirs["current"], "h100", args=["-m", "synord.hwprobe", "--json"])
    gpus = [d for d in prof["devices"] if d["kind"] == "gpu"]
    assert [g["model"] for g in gpus] == ["NVIDIA H100 80GB HBM3"]
    assert prof["offerable"]["gpus"] == 1


def test_refresh_reads_new_utilisation(stub_dirs):
    code = ("import os, json; from synord import hwprobe\n"
            "p = hwprobe.probe()\n"
            "os.environ['NVML_STUB_UTIL'] = '93'\n"
            "q = hwprobe.refresh_dynamic(p)\n"
            "g = lambda prof: [d['utilization_percent'] for d in prof.devices if d['kind'] == 'gpu']\n"
            "print(json.dumps({'before': g(p), 'after': g(q), 'classes': hwprobe.resource_classes(q)}))")
    out = run(code, stub_dirs["current"], "h100")
    assert out["before"] == [7] and out["after"] == [93]
    assert "gpu.h100" in out["classes"]
