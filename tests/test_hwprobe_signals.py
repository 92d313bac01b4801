"""Contributor signals from fake /sys and /proc trees: power, battery,
terminal idle time, CPU pressure."""

import os
import time
from pathlib import Path

from synord.hwprobe.signals import ContributorSignals, read_signals


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def supply(root: Path, name: str, **files: str) -> None:
    for k, v in files.items():
        write(root / "sys/class/power_supply" / name / k, v + "\n")


def test_no_battery_means_mains(tmp_path):
    s = read_signals(tmp_path, now=0)
    assert s.on_ac_power is True and s.battery_percent is None
    assert s.user_idle_s is None and s.idle_source == "none"


def test_laptop_on_battery(tmp_path):
    supply(tmp_path, "AC", type="Mains", online="0")
    supply(tmp_path, "BAT0", type="Battery", capacity="42", status="Discharging")
    supply(tmp_path, "hidpp_battery_0", type="Battery", capacity="5", scope="Device")  # a mouse
    s = read_signals(tmp_path)
    assert s.on_ac_power is False and s.battery_percent == 42.0


def test_laptop_plugged_in(tmp_path):
    supply(tmp_path, "ADP1", type="Mains", online="1")
    supply(tmp_path, "BAT0", type="Battery", capacity="80", status="Charging")
    assert read_signals(tmp_path).on_ac_power is True


def test_battery_without_mains_node_uses_status(tmp_path):
    supply(tmp_path, "BAT1", type="Battery", capacity="97", status="Full")
    assert read_signals(tmp_path).on_ac_power is True


def test_tty_idle_time_like_w(tmp_path):
    now = time.time()
    for n, age in (("0", 3600), ("3", 120)):
        pts = tmp_path / "dev/pts" / n
        write(pts, "")
        os.utime(pts, (now - age, now - age))
    s = read_signals(tmp_path, now=now)
    assert s.idle_source == "tty" and abs(s.user_idle_s - 120) < 1


def test_cpu_pressure_between_two_samples_and_psi(tmp_path):
    write(tmp_path / "proc/loadavg", "1.00 0.5 0.2 1/1 1\n")
    write(tmp_path / "proc/stat", "cpu  1000 0 0 1000 0 0 0 0 0 0\ncpu0 x\ncpu1 x\n")
    write(tmp_path / "proc/pressure/cpu", "some avg10=12.50 avg60=3.00 avg300=1.00 total=1\n"
                                          "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    first = read_signals(tmp_path)
    assert first.cpu_pressure == 0.5  # first look: load 1.0 over 2 CPUs
    assert first.cpu_psi_some_avg10 == 0.125
    # Then 300 busy of 400 jiffies went by: 75 % used by others (fake root: none is ours).
    write(tmp_path / "proc/stat", "cpu  1300 0 0 1100 0 0 0 0 0 0\ncpu0 x\ncpu1 x\n")
    assert read_signals(tmp_path).cpu_pressure == 0.75


def test_json_round_trip_and_hour(tmp_path):
    noon = time.mktime((2026, 6, 1, 12, 30, 0, 0, 0, -1))
    s = read_signals(tmp_path, now=noon)
    assert s.hour_of_day == 12
    assert ContributorSignals.from_json(s.to_json()) == s


def test_real_machine_signals_are_sane():
    s = read_signals()
    assert 0.0 <= s.cpu_pressure <= 1.0 and 0 <= s.hour_of_day < 24
    assert isinstance(s.on_ac_power, bool)


def test_cpu_of_our_own_children_is_not_other_load():
    import subprocess
    import sys

    from synord.hwprobe.signals import _own_cpu_s

    def mine() -> float:
        t = os.times()
        return t.user + t.system

    before, before_mine = _own_cpu_s(), mine()
    child = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<5: pass"])
    try:
        deadline = time.time() + 10
        grown = 0.0
        while grown < 0.1 and time.time() < deadline:
            time.sleep(0.05)
            # What the probe attributes to us beyond this process's own CPU.
            grown = (_own_cpu_s() - before) - (mine() - before_mine)
        assert grown >= 0.1  # the running (not yet reaped) child counts as ours
    finally:
        child.kill()
        child.wait()
