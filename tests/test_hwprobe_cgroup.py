"""Container limits from fake cgroup v1, v2 and hybrid trees, and that the
host profile and the offer respect them."""

from pathlib import Path

from synord import hwprobe
from synord.hwprobe.cgroup import read_limits

MEMINFO = "MemTotal:       16384000 kB\nMemAvailable:   12000000 kB\n"
CPUINFO = "".join(f"processor\t: {i}\nmodel name\t: Test CPU\ncpu MHz\t\t: 1000\nphysical id\t: 0\ncore id\t\t: {i}\n\n"
                  for i in range(8))


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def machine(root: Path) -> Path:
    write(root / "proc/cpuinfo", CPUINFO)
    write(root / "proc/meminfo", MEMINFO)
    write(root / "proc/loadavg", "0.00 0.00 0.00 1/100 1\n")
    return root


def v2_tree(root: Path) -> Path:
    machine(root)
    write(root / "proc/self/cgroup", "0::/system.slice/synord.service\n")
    write(root / "proc/self/mountinfo",
          "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n")
    cg = root / "sys/fs/cgroup"
    write(cg / "cgroup.controllers", "cpuset cpu io memory pids\n")
    write(cg / "system.slice/cpu.max", "max 100000\n")
    write(cg / "system.slice/memory.max", str(4 * 2**30) + "\n")   # the parent is tighter
    write(cg / "system.slice/synord.service/cpu.max", "250000 100000\n")
    write(cg / "system.slice/synord.service/memory.max", str(8 * 2**30) + "\n")
    write(cg / "system.slice/synord.service/memory.current", str(2**30) + "\n")
    write(cg / "system.slice/synord.service/cpuset.cpus.effective", "0-5\n")
    return root


def test_v2_nested_limits_take_the_tightest(tmp_path):
    lim = read_limits(v2_tree(tmp_path))
    assert lim == {"version": 2, "cpu_quota_cores": 2.5, "cpuset_cpus": 6,
                   "memory_limit_bytes": 4 * 2**30, "memory_usage_bytes": 2**30}


def test_v2_without_mountinfo_uses_the_conventional_mount(tmp_path):
    root = v2_tree(tmp_path)
    (root / "proc/self/mountinfo").unlink()
    assert read_limits(root)["cpu_quota_cores"] == 2.5


def test_v2_unlimited(tmp_path):
    machine(tmp_path)
    write(tmp_path / "proc/self/cgroup", "0::/\n")
    write(tmp_path / "sys/fs/cgroup/cgroup.controllers", "cpu memory\n")
    lim = read_limits(tmp_path)
    assert lim["version"] == 2 and lim["cpu_quota_cores"] is None and lim["memory_limit_bytes"] is None


def test_v1_with_container_mount_roots(tmp_path):
    root = machine(tmp_path)
    # Docker without a cgroup namespace: our path is /docker/abc, the mount shows only that subtree.
    write(root / "proc/self/cgroup", "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n3:cpuset:/docker/abc\n0::/\n")
    write(root / "proc/self/mountinfo",
          "40 31 0:35 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpu,cpuacct\n"
          "41 31 0:36 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n"
          "42 31 0:37 /docker/abc /sys/fs/cgroup/cpuset ro - cgroup cgroup rw,cpuset\n")
    cg = root / "sys/fs/cgroup"
    write(cg / "cpu,cpuacct/cpu.cfs_quota_us", "150000\n")
    write(cg / "cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    write(cg / "memory/memory.limit_in_bytes", str(3 * 2**30) + "\n")
    write(cg / "memory/memory.usage_in_bytes", str(2**29) + "\n")
    write(cg / "cpuset/cpuset.cpus", "0-1,4\n")
    assert read_limits(root) == {"version": 1, "cpu_quota_cores": 1.5, "cpuset_cpus": 3,
                                 "memory_limit_bytes": 3 * 2**30, "memory_usage_bytes": 2**29}


def test_v1_unlimited_values_mean_no_limit(tmp_path):
    root = machine(tmp_path)
    write(root / "proc/self/cgroup", "4:memory:/\n1:cpu:/\n")
    cg = root / "sys/fs/cgroup"
    write(cg / "cpu/cpu.cfs_quota_us", "-1\n")
    write(cg / "cpu/cpu.cfs_period_us", "100000\n")
    write(cg / "memory/memory.limit_in_bytes", "9223372036854771712\n")
    lim = read_limits(root)
    assert lim["version"] == 1 and lim["cpu_quota_cores"] is None and lim["memory_limit_bytes"] is None


def test_hybrid_prefers_v1_controllers(tmp_path):
    root = machine(tmp_path)
    write(root / "proc/self/cgroup", "4:memory:/a\n1:cpu:/a\n0::/a\n")
    write(root / "proc/self/mountinfo",
          "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
          "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
          "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
    write(root / "sys/fs/cgroup/unified/cgroup.controllers", "\n")
    write(root / "sys/fs/cgroup/cpu/a/cpu.cfs_quota_us", "50000\n")
    write(root / "sys/fs/cgroup/cpu/a/cpu.cfs_period_us", "100000\n")
    write(root / "sys/fs/cgroup/memory/a/memory.limit_in_bytes", str(2**30) + "\n")
    lim = read_limits(root)
    assert (lim["version"], lim["cpu_quota_cores"], lim["memory_limit_bytes"]) == (1, 0.5, 2**30)


def test_no_cgroup_at_all(tmp_path):
    lim = read_limits(machine(tmp_path))
    assert lim["version"] is None and lim["cpu_quota_cores"] is None


def test_probe_and_offer_respect_the_container(tmp_path):
    profile = hwprobe.probe(sysfs_root=v2_tree(tmp_path))
    host = profile.host
    assert host["logical_cores"] == 8 and host["effective_cpus"] == 2.5
    assert host["memory_effective_bytes"] == 4 * 2**30
    # The CPU peak counts only the cores the container may use.
    assert profile.devices[0]["throughput"]["fp32_gflops"] == 2.5 * 1.0 * 8
    offer = profile.offerable
    assert offer["allowed"] and offer["cpus"] <= 2.5
    # Memory: 80% of the 4 GiB limit, and never more than the 3 GiB left in the cgroup.
    assert offer["memory_bytes"] == min(int(4 * 2**30 * 0.8), 3 * 2**30)
