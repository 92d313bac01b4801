"""Contributor limits -> offerable capacity, the known-device matcher and
market resource classes."""

import pytest

from synord.hwprobe import CapabilityProfile, ContributorLimits, ContributorSignals, offerable, resource_classes
from synord.hwprobe import known
from synord.hwprobe.policy import PREFERENCES, Usage, coerce, decide, evaluability, parse_weekly


def signals(**kw) -> ContributorSignals:
    base = dict(on_ac_power=True, battery_percent=None, user_idle_s=None, idle_source="none",
                cpu_pressure=0.0, cpu_psi_some_avg10=None, hour_of_day=12)
    base.update(kw)
    return ContributorSignals(**base)


def profile(n_gpus=2) -> CapabilityProfile:
    gpu = {"kind": "gpu", "vendor": "NVIDIA", "model": "NVIDIA H100 80GB HBM3", "slug": "h100",
           "tier": "datacenter", "usable": True, "memory_bytes": 80 * 2**30, "throughput": {}}
    devices = [{"kind": "cpu", "vendor": "x", "model": "x", "memory_bytes": 0, "throughput": {}}]
    devices += [dict(gpu, index=i) for i in range(n_gpus)]
    devices.append({"kind": "opencl", "device_type": "cpu", "vendor": "x", "model": "pocl",
                    "memory_bytes": 0, "throughput": {}})
    host = {"logical_cores": 16, "effective_cpus": 16.0, "memory_total_bytes": 64 * 2**30,
            "memory_effective_bytes": 64 * 2**30, "memory_available_bytes": 60 * 2**30,
            "cgroup": {"memory_limit_bytes": None, "memory_usage_bytes": None}}
    return CapabilityProfile(devices=devices, host=host)


def test_full_share_when_everything_allows():
    o = offerable(profile(), ContributorLimits(cpu_share=1.0, memory_share=0.5), signals())
    assert o == {"cpus": 16.0, "memory_bytes": 32 * 2**30, "gpus": 2, "opencl_devices": 1,
                 "allowed": True, "why_not": None}


def test_shares_and_other_load_reduce_the_offer():
    o = offerable(profile(), ContributorLimits(cpu_share=0.5, gpu_share=0.5), signals(cpu_pressure=0.75))
    # 16 CPUs, others use 12: only 4 are free although the share would allow 8.
    assert o["cpus"] == 4.0 and o["gpus"] == 1
    o = offerable(profile(n_gpus=1), ContributorLimits(gpu_share=0.5, cpu_share=0.0), signals())
    assert o["gpus"] == 0 and o["cpus"] == 0.0 and o["opencl_devices"] == 0


def test_memory_never_above_what_is_available():
    p = profile()
    p.host["memory_available_bytes"] = 2**30
    assert offerable(p, ContributorLimits(memory_share=1.0), signals())["memory_bytes"] == 2**30


@pytest.mark.parametrize("limits,sig,reason", [
    (ContributorLimits(ac_only=True), signals(on_ac_power=False, battery_percent=90), "battery power"),
    (ContributorLimits(min_battery_percent=30), signals(on_ac_power=False, battery_percent=20), "battery at 20%"),
    (ContributorLimits(idle_only=True, idle_after_s=300), signals(user_idle_s=10), "user active"),
    (ContributorLimits(allowed_hours="09-17"), signals(hour_of_day=17), "outside allowed hours"),
    (ContributorLimits(allowed_hours="22-06"), signals(hour_of_day=12), "outside allowed hours"),
])
def test_policy_forbids(limits, sig, reason):
    o = offerable(profile(), limits, sig)
    assert o["allowed"] is False and reason in o["why_not"]
    assert (o["cpus"], o["memory_bytes"], o["gpus"], o["opencl_devices"]) == (0.0, 0, 0, 0)


@pytest.mark.parametrize("limits,sig", [
    (ContributorLimits(ac_only=True), signals(on_ac_power=True, battery_percent=10)),
    (ContributorLimits(min_battery_percent=30), signals(on_ac_power=False, battery_percent=31)),
    (ContributorLimits(idle_only=True), signals(user_idle_s=301)),
    (ContributorLimits(allowed_hours="09-17"), signals(hour_of_day=9)),
    (ContributorLimits(allowed_hours="22-06"), signals(hour_of_day=23)),
    (ContributorLimits(allowed_hours="22-06"), signals(hour_of_day=5)),
])
def test_policy_allows(limits, sig):
    assert offerable(profile(), limits, sig)["allowed"] is True


@pytest.mark.parametrize("kw", [{"cpu_share": 1.5}, {"memory_share": -0.1}, {"allowed_hours": "9 to 5"},
                                {"allowed_hours": "25-03"}, {"allowed_hours": "08-08"},
                                {"min_battery_percent": 120}])
def test_bad_limits_are_rejected_clearly(kw):
    with pytest.raises(ValueError):
        ContributorLimits(**kw)


def test_limits_json_round_trip_and_unknown_keys():
    lim = ContributorLimits(cpu_share=0.25, idle_only=True, allowed_hours="22-06")
    assert ContributorLimits.from_json(lim.to_json()) == lim
    with pytest.raises(ValueError, match="gpu_shares"):
        ContributorLimits.from_json({"gpu_shares": 1})


@pytest.mark.parametrize("name,pci,model", [
    ("NVIDIA H100 80GB HBM3", None, "H100 SXM5 80GB"),
    ("NVIDIA H100 PCIe", None, "H100 PCIe 80GB"),
    ("NVIDIA H100 NVL", None, "H100 NVL 94GB"),
    ("NVIDIA H200", None, "H200 SXM 141GB"),
    ("NVIDIA A100-SXM4-40GB", None, "A100 SXM4 40GB"),
    ("NVIDIA A100 80GB PCIe", None, "A100 PCIe 80GB"),
    ("NVIDIA L4", None, "L4"),
    ("NVIDIA L40S", None, "L40S"),
    ("NVIDIA GeForce RTX 4090", None, "GeForce RTX 4090"),
    ("anything", "10de:2335", "H200 SXM 141GB"),
    ("Apple M2 Ultra", None, "M2 Ultra"),
    ("Intel(R) Arc(TM) A770 Graphics", None, "Arc A770"),
])
def test_known_device_matcher(name, pci, model):
    assert known.match(name, pci)["model"] == model


def test_unknown_device_matches_nothing():
    assert known.match("NVIDIA Quadro K420") is None
    assert known.throughput(None)["source"] is None


def test_resource_classes():
    p = profile()
    p.devices.append({"kind": "gpu", "vendor": "NVIDIA", "model": "NVIDIA GeForce RTX 4090", "slug": "rtx4090",
                      "tier": "consumer", "usable": True, "throughput": {}})
    p.devices.append({"kind": "gpu", "vendor": "NVIDIA", "model": "Quadro", "slug": None, "tier": None,
                      "usable": True, "throughput": {}})
    assert resource_classes(p) == ["cpu", "gpu.h100", "opencl", "gpu.consumer"]


# ---- the one decision, the preferences BOINC has ------------------------------------------

def test_idle_only_without_an_idle_signal_is_reported_and_not_satisfied():
    lim = ContributorLimits(idle_only=True)
    d = decide(lim, signals(user_idle_s=None))
    assert d.contributing is False and d.hand_back
    assert "idle_only: cannot evaluate: no idle signal" in d.why_not
    assert "cannot evaluate" in evaluability(lim, signals(user_idle_s=None))["idle_only"]
    assert offerable(profile(), lim, signals(user_idle_s=None))["why_not"] == d.why_not
    assert "idle_only" not in evaluability(lim, signals(user_idle_s=3))


def test_pause_disable_and_every_reason_are_listed():
    lim = ContributorLimits(allowed_hours="01-02", ac_only=True)
    d = decide(lim, signals(on_ac_power=False, battery_percent=50), enabled=True, paused=True)
    assert d.reasons[0] == "paused by the owner" and len(d.reasons) == 3
    assert "outside allowed hours 01-02 (now 12h)" in d.why_not
    assert decide(ContributorLimits(), signals(), enabled=False).reasons[0].startswith("disabled in config.toml")
    assert decide(ContributorLimits(), signals()).contributing


@pytest.mark.parametrize("weekly,weekday,hour,ok", [
    ("mon-fri 18-08; sat,sun 00-24", 0, 19, True),
    ("mon-fri 18-08; sat,sun 00-24", 2, 12, False),
    ("mon-fri 18-08; sat,sun 00-24", 6, 12, True),
    ("fri-mon 09-17", 0, 10, True),       # a range across the week's end
    ("fri-mon 09-17", 2, 10, False),      # not listed: no work that day
])
def test_weekday_hours(weekly, weekday, hour, ok):
    d = decide(ContributorLimits(weekday_hours=weekly), signals(hour_of_day=hour, weekday=weekday))
    assert d.contributing is ok and (ok or "outside weekday hours" in d.why_not)


def test_weekday_hours_parse_and_refuse():
    assert parse_weekly("sat,sun 00-24") == {5: (0, 24), 6: (0, 24)}
    for bad in ("someday 10-12", "mon 10", "mon 25-02", "10-12"):
        with pytest.raises(ValueError):
            ContributorLimits(weekday_hours=bad)


def test_network_hours_transfer_and_disk_stop_new_work_only():
    lim = ContributorLimits(network_hours="22-07", daily_transfer_bytes=1 << 30, disk_limit_bytes=2 << 30)
    d = decide(lim, signals(hour_of_day=12), Usage(cache_bytes=3 << 30, transferred_today_bytes=1 << 30))
    assert not d.contributing and not d.hand_back and len(d.reasons) == 3
    assert "daily transfer limit reached (1.0 GiB of 1.0 GiB today)" in d.why_not
    assert "task cache 3.0 GiB over its disk limit 2.0 GiB" in d.why_not
    assert decide(lim, signals(hour_of_day=23), Usage(0, 0)).contributing
    # Unmeasured usage is not a pass: it is reported and holds new work back.
    d = decide(lim, signals(hour_of_day=23), Usage(None, None))
    assert not d.contributing and "cannot evaluate" in d.why_not


def test_suspend_on_other_cpu_use_throttles_instead_of_handing_back():
    lim = ContributorLimits(suspend_cpu_percent=50, cpu_time_percent=60)
    assert decide(lim, signals(cpu_pressure=0.3)).throttle == pytest.approx(0.6)
    d = decide(lim, signals(cpu_pressure=0.8))
    assert not d.contributing and not d.hand_back and d.throttle == 0.01
    assert "other processes use 80% CPU (> 50%)" in d.why_not


def test_memory_in_use_and_idle_and_gpu_only_while_idle():
    lim = ContributorLimits(memory_share=0.25, memory_share_idle=0.75, gpu_idle_only=True, idle_after_s=60)
    busy = offerable(profile(), lim, signals(user_idle_s=5))
    idle = offerable(profile(), lim, signals(user_idle_s=600))
    assert busy["memory_bytes"] == 16 * 2**30 and busy["gpus"] == 0
    assert idle["memory_bytes"] == 48 * 2**30 and idle["gpus"] == 2
    unknown = offerable(profile(), lim, signals(user_idle_s=None))
    assert unknown["memory_bytes"] == 16 * 2**30 and unknown["gpus"] == 0  # in-use values apply
    notes = evaluability(lim, signals(user_idle_s=None), gpus=0, can_throttle=False)
    assert {"memory_share_idle", "gpu_idle_only", "gpu_share", "cpu_time_percent"} <= set(notes)


def test_preference_table_covers_every_limit_and_coerces_text():
    import dataclasses
    assert set(PREFERENCES) == {f.name for f in dataclasses.fields(ContributorLimits)}
    assert coerce("daily_transfer_bytes", "2G") == 2 << 30
    assert coerce("bandwidth_bytes_per_s", "10MiB/s") == 10 << 20
    assert coerce("idle_only", "yes") is True and coerce("cpu_time_percent", "50%") == 50.0
    for key, bad in (("idle_only", "maybe"), ("cpu_share", "lots"), ("disk_limit_bytes", "big")):
        with pytest.raises(ValueError):
            coerce(key, bad)
    with pytest.raises(ValueError, match="unknown preference"):
        coerce("cpu_shares", 1)
