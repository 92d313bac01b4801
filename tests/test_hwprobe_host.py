"""CPU and host facts from fake /proc and /sys trees (x86, arm64, riscv)."""

from pathlib import Path

from synord.hwprobe.host import probe_host


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_x86_smt_cores_and_flags(tmp_path):
    blocks = []
    for i in range(4):  # 2 cores x 2 threads
        blocks.append(f"processor\t: {i}\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654\n"
                      f"flags\t\t: sse4_2 avx avx2 fma avx512f avx512_vnni\ncpu MHz\t\t: 1500.0\n"
                      f"physical id\t: 0\ncore id\t\t: {i // 2}\n")
    write(tmp_path / "proc/cpuinfo", "\n".join(blocks))
    write(tmp_path / "proc/meminfo", "MemTotal: 1000 kB\nMemAvailable: 500 kB\n")
    write(tmp_path / "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", "3700000\n")
    host, cpu = probe_host(tmp_path)
    assert (host["physical_cores"], host["logical_cores"]) == (2, 4)
    assert host["isa"] == ["avx", "avx2", "avx512_vnni", "avx512f", "fma", "sse4_2"]
    assert host["memory_total_bytes"] == 1000 * 1024 and host["memory_available_bytes"] == 500 * 1024
    # cpufreq max wins over the current MHz; Zen splits AVX-512 -> 32 FLOPs/cycle.
    assert cpu["max_mhz"] == 3700.0
    assert cpu["throughput"]["fp32_gflops"] == 2 * 3.7 * 32


def test_arm64_features_and_sysfs_topology(tmp_path):
    blocks = [f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve sve2 i8mm bf16 atomics\n"
              f"CPU implementer\t: 0x41\n" for i in range(4)]
    write(tmp_path / "proc/cpuinfo", "\n".join(blocks))
    for i in range(4):
        write(tmp_path / f"sys/devices/system/cpu/cpu{i}/topology/core_id", f"{i}\n")
        write(tmp_path / f"sys/devices/system/cpu/cpu{i}/topology/physical_package_id", "0\n")
    host, cpu = probe_host(tmp_path)
    assert (host["physical_cores"], host["logical_cores"]) == (4, 4)
    assert {"sve", "sve2", "i8mm", "bf16", "asimd"} <= set(host["isa"])
    assert cpu["vendor"] == "0x41"
    assert cpu["throughput"]["fp32_gflops"] is None  # no clock known: no guess


def test_riscv_vector_extension(tmp_path):
    write(tmp_path / "proc/cpuinfo", "processor\t: 0\nisa\t\t: rv64imafdcv_zicsr_zifencei\nuarch\t\t: sifive,x280\n")
    host, cpu = probe_host(tmp_path)
    assert "rvv" in host["isa"] and cpu["model"] == "sifive,x280"
