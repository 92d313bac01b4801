"""GPU asks and bids, allocation by UUID, pricing per class, agreement and
receipt fields, the submission check and the meter — without daemons."""

from __future__ import annotations

import dataclasses
import pytest

from synord.protocols.negotiation import BodyError, Terms
from synord.protocols.orders import Ask, Bid, OrderError
from synord.protocols.receipts import ReceiptError, SignedReceipt, check_against, countersign, issue
from synord.gpu_devices import GpuAllocator, offer_classes, unit_fits
from synord.gpu_meter import Meter
from synord.gpu_request import gpu_request
from synord.market.matching import match
from synord.market.pricing import PricingPolicy, derive_asks, gpu_class_factor, unit_price
from synord.market.reservations import InsufficientCapacity
from synord.store import Store

from test_market_book import NOW, ask, bid
from test_negotiation import C_ID, P_ID, T0, terms

H100 = {"class": "h100", "vendor": "nvidia", "memory_bytes": 80 << 30, "compute_capability": "9.0",
        "power_limit_w": 700.0}
A100 = {"class": "a100", "vendor": "nvidia", "memory_bytes": 40 << 30, "compute_capability": "8.0"}


def units():
    return [dict(H100, id="GPU-a", index=0), dict(H100, id="GPU-b", index=1), dict(A100, id="GPU-c", index=2)]


# ---- allocation ------------------------------------------------------------------------------

def test_allocation_is_exclusive_and_released(tmp_path):
    store = Store(tmp_path / "state.db")
    alloc = GpuAllocator(store, units)
    first = alloc.reserve("c1/n1", 1, "h100")
    second = alloc.reserve("c2/n2", 1, "h100")
    assert {first, second} == {("GPU-a",), ("GPU-b",)}
    assert alloc.reserve("c1/n1", 1, "h100") == first  # the same holder asking again gets the same
    with pytest.raises(InsufficientCapacity, match="gpus: need 1, free 0"):
        alloc.reserve("c3/n3", 1, "h100")
    assert alloc.reserve("c3/n3", 1) == ("GPU-c",)  # any class: what is left
    assert alloc.release("c1/n1") == 1
    assert alloc.reserve("c4/n4", 1, "h100") == first
    # A running task keeps its devices even when its lease ends first (a silent consumer).
    alloc.task_started("c4/n4")
    assert alloc.release("c4/n4") == 0 and alloc.held()["GPU-a"] == "c4/n4"
    assert alloc.task_ended("c4/n4") == 1 and "GPU-a" not in alloc.held()
    alloc.reserve("c4/n4", 1, "h100")
    # Persisted: a new allocator over the same store sees the holds; release_all clears them.
    again = GpuAllocator(Store(tmp_path / "state.db"), units)
    assert set(again.held()) == {"GPU-a", "GPU-b", "GPU-c"}
    assert again.release_all() == 3 and again.held() == {}


def test_unit_fit_by_class_memory_and_cuda():
    h = dict(H100, id="x")
    assert unit_fits(h, "h100", 80 << 30, "9.0") is None
    assert unit_fits(h, "a100") == "class"
    assert unit_fits(h, None, 81 << 30) == "memory"
    assert unit_fits(h, None, None, "10.0") == "cuda" and unit_fits(h, None, None, "8.9") is None


def test_offer_classes_group_units():
    off = offer_classes(units(), 3)
    assert [(c["class"], c["count"], c["memory"], c["cuda"]) for c in off] == [
        ("h100", 2, 80 << 30, "9.0"), ("a100", 1, 40 << 30, "8.0")]
    assert off[0]["watts"] == 700.0 and off[0]["runtimes"] == ["container"]
    assert offer_classes(units(), 1)[0]["count"] == 1  # the contributor's GPU share


# ---- pricing per class -----------------------------------------------------------------------------

def test_an_h100_is_not_priced_like_a_consumer_card():
    p = PricingPolicy()
    h100, a100, consumer = (unit_price(p, "gpu", 16.0, gpu_class=c) for c in ("h100", "a100", "consumer"))
    assert h100 > a100 > consumer
    assert gpu_class_factor("h100") == pytest.approx(9.894) and gpu_class_factor("consumer") == 1.0
    # A 1g MIG slice pays a seventh of its GPU's wear.
    assert gpu_class_factor("h100-1g-10gb") == pytest.approx(9.894 / 7)
    # The device's own power limit, when known, is the power cost.
    assert unit_price(p, "gpu", 16.0, gpu_class="h100", watts=700) > h100


def test_derive_asks_one_per_gpu_class():
    cap = {"cpus": 8.0, "memory_bytes": 64 << 30, "gpus": 3, "runtimes": ["wasm", "container"],
           "gpu_classes": offer_classes(units(), 3)}
    asks = derive_asks(cap, PricingPolicy(), now=NOW)
    assert [(a.resource_class, a.gpu_class, a.gpus, a.runtimes) for a in asks] == [
        ("cpu", None, 0, ("wasm", "container")), ("gpu", "h100", 2, ("container",)),
        ("gpu", "a100", 1, ("container",))]
    h, a = asks[1], asks[2]
    assert h.price > a.price and (h.gpu_memory, h.cuda) == (80 << 30, "9.0")
    assert len({x.id for x in asks}) == 3
    # No container runtime here: no GPU ask at all.
    assert [x.resource_class for x in derive_asks(dict(cap, runtimes=["wasm"]), PricingPolicy(), now=NOW)] == ["cpu"]


# ---- orders and matching -------------------------------------------------------------------------------

def test_gpu_fields_on_the_wire_only_when_set():
    a = ask(cls="gpu", gpus=2, gpu_class="h100", gpu_memory=80 << 30, cuda="9.0")
    assert Ask.from_body(a.to_body()).cuda == "9.0" and Ask.from_body(a.to_body()).gpu_memory == 80 << 30
    assert "cuda" not in ask().to_body() and "gpu_memory" not in bid().to_body()
    b = bid(resource_class="gpu", gpus=1, runtime="container", gpu_memory=1 << 30, cuda="8.6")
    assert Bid.from_body(b.to_body()) == dataclasses.replace(b, peer="", ts=0)
    for bad in ("9", "9.0.1", "x.y", 9.0):
        with pytest.raises(OrderError, match="cuda"):
            Ask.from_body(dict(a.to_body(), cuda=bad))


def test_matching_names_the_gpu_constraint():
    asks = [ask("h", cls="gpu", gpus=2, gpu_class="h100", gpu_memory=80 << 30, cuda="9.0"),
            ask("a", cls="gpu", gpus=1, gpu_class="a100", gpu_memory=40 << 30, cuda="8.0", price=0.5),
            ask("old", cls="gpu", gpus=1, gpu_class="consumer", price=0.1)]
    need = dict(resource_class="gpu", runtime="container", max_price=5.0)
    r = match(bid(gpus=1, gpu_memory=48 << 30, **need), asks, now=NOW)
    assert [c.ask.id for c in r.candidates] == ["h"] and r.excluded["gpu_memory"] == 2
    r = match(bid(gpus=1, cuda="9.0", gpu_memory=1, **need), asks, now=NOW)
    assert [c.ask.id for c in r.candidates] == ["h"]
    r = match(bid(gpus=1, cuda="10.0", **need), asks, now=NOW)
    assert not r and r.excluded["cuda"] == 3 and "need CUDA compute capability >= 10.0" in r.explain()
    r = match(bid(gpus=3, **need), asks, now=NOW)
    assert "accelerator excluded 3 (need 3 x any accelerator)" in r.explain()


# ---- agreement and receipt ---------------------------------------------------------------------------------

def gpu_terms(**kw):
    return terms(resource_class="gpu", gpus=2, gpu_class="h100", units=2.0, runtime="container", **kw)


def test_agreement_names_device_uuids_and_is_unchanged_without():
    t = gpu_terms(devices=("GPU-a", "GPU-b"))
    assert Terms.from_body(t.to_body()) == t and t.to_body()["resources"]["devices"] == ["GPU-a", "GPU-b"]
    assert "devices" not in terms().to_body()["resources"]  # a CPU agreement signs what it always signed
    for bad in (["GPU-a"], ["GPU-a", "GPU-a"], ["GPU-a", "../x"], ["GPU-a", 7]):
        body = t.to_body()
        body["resources"]["devices"] = bad
        with pytest.raises(BodyError, match="devices"):
            Terms.from_body(body)


def test_receipt_carries_gpu_metering_signed():
    t = gpu_terms(devices=("GPU-a", "GPU-b"))
    sr = issue(P_ID, t, cpu_s=1.0, peak_memory=1, started=T0, ended=T0 + 100_000,
               gpu={"gpu_s": 150.0, "gpu_peak_memory": 3 << 30, "gpu_energy_j": 5000.0})
    full = countersign(C_ID, SignedReceipt.from_body(sr.to_body()), t)
    r = SignedReceipt.from_body(full.to_body()).receipt
    assert (r.gpu_s, r.gpu_peak_memory, r.gpu_energy_j) == (150.0, 3 << 30, 5000.0)
    # Changing the metering breaks the provider's signature.
    bad = dataclasses.replace(sr, receipt=dataclasses.replace(sr.receipt, gpu_s=1.0))
    with pytest.raises(ReceiptError, match="signature"):
        check_against(bad, t)
    # Never more busy GPU-seconds than devices x wall time (issue clamps; a forged one is refused).
    over = issue(P_ID, t, cpu_s=1.0, peak_memory=1, started=T0, ended=T0 + 100_000, gpu={"gpu_s": 9e9})
    assert over.receipt.gpu_s == 200.0
    # GPU fields on a CPU agreement: refused (and issue never puts them there).
    cpu = issue(P_ID, terms(), cpu_s=1.0, peak_memory=1, started=T0, ended=T0 + 1000, gpu={"gpu_s": 1.0})
    assert cpu.receipt.gpu_s is None and "gpu_s" not in cpu.receipt.to_body()
    forged = issue(P_ID, gpu_terms(), cpu_s=1.0, peak_memory=1, started=T0, ended=T0 + 1000, gpu={"gpu_s": 1.0})
    with pytest.raises(ReceiptError, match="without GPUs"):
        check_against(forged, terms())


# ---- submission and metering -------------------------------------------------------------------------------

@pytest.mark.parametrize("req,kind,msg", [
    ({"gpus": 1}, "wasm", "WASM sandbox cannot be given devices"),
    ({"gpus": 1}, "runc", "runc cannot take devices"),  # microVMs take VFIO GPUs: tests/test_gpu_vfio.py
    ({"gpu_class": "h100"}, "container", "needs --gpus"),
    ({"gpus": 1.5}, "container", "integer"),
    ({"gpus": 1, "gpu_class": "H100!"}, "container", "class name"),
    ({"gpus": 1, "cuda_capability": "9"}, "container", "MAJOR.MINOR"),
    ({"gpus": 1, "gpu_memory": -1}, "container", "positive"),
])
def test_gpu_request_refused_before_anything_is_reserved(req, kind, msg):
    with pytest.raises(ValueError, match=msg):
        gpu_request(req, kind)


def test_gpu_request_accepted():
    assert gpu_request({}, "wasm") is None
    assert gpu_request({"gpus": 2, "gpu_class": "gpu.h100", "gpu_memory": 1 << 30, "cuda_capability": "8.0"},
                       "container") == {"gpus": 2, "gpu_class": "h100", "gpu_memory": 1 << 30, "cuda": "8.0"}


def test_meter_integrates_utilisation_power_and_peak_memory():
    m = Meter({"GPU-a": 0, "GPU-b": 1}, last=100.0)
    m.add({"GPU-a": {"utilization_percent": 50, "power_w": 100.0, "memory_used_bytes": 1 << 30},
           "GPU-b": {"utilization_percent": 100, "power_w": 200.0, "memory_used_bytes": 2 << 30}}, 102.0)
    m.add({"GPU-a": {"utilization_percent": None, "power_w": None, "memory_used_bytes": None}}, 103.0)
    t = m.totals()
    assert t["gpu_s"] == 3.0 and t["gpu_energy_j"] == 600.0 and t["gpu_peak_memory"] == 3 << 30


# ---- negotiation: the very devices, reserved with the agreement ------------------------------------------

def test_racing_consumers_for_the_last_gpu_one_agreement_naming_it(tmp_path):
    from synord.protocols.envelope import decode, now_ms
    from synord.protocols.identity import Identity
    from synord.market.negotiator import Consumer, Provider
    from synord.market.reservations import CapacityPool
    from test_negotiation import TO, deliver

    alloc = GpuAllocator(Store(tmp_path / "state.db"), lambda: units()[:2])
    alloc.reserve("someone/else", 1, "h100")  # GPU-a is taken already: one H100 left
    pool = CapacityPool({"cpus": 64.0, "memory_bytes": 1 << 40, "gpus": 4})
    prov = Provider(P_ID, pool, timeouts=TO, devices=alloc)
    # The ask still says 2 (published before GPU-a was taken): only the allocator knows better.
    prov.offer(ask("g", peer=P_ID.peer_id, cls="gpu", gpus=2, gpu_class="h100", cores=64.0, memory=1 << 40,
                   runtimes=("container",), expires=now_ms() + 3_600_000, max_duration_s=86_400))
    consumers = [Consumer(Identity.generate(), timeouts=TO) for _ in range(3)]
    parties = {P_ID.peer_id: prov, **{c.peer_id: c for c in consumers}}
    need = dict(resource_class="gpu", gpus=1, gpu_class="h100", cores=1.0, runtime="container")
    proposals = [s for c in consumers for s in c.place(bid(**need), [prov.asks["g"]])]
    answers = [a for s in proposals for a in prov.receive(s.envelope.encode())]
    assert sorted(a.envelope.type for a in answers) == ["agreement", "reject", "reject"]
    (agreement,) = [decode(a.envelope.encode()).body for a in answers if a.envelope.type == "agreement"]
    assert agreement["terms"]["resources"]["devices"] == ["GPU-b"]
    rejects = [decode(a.envelope.encode()).body for a in answers if a.envelope.type == "reject"]
    assert all(r["reason"] == "capacity" and "insufficient gpus" in r["detail"] for r in rejects)
    deliver(answers, parties)
    (m,) = [m for m in prov.negotiations.values() if m.terms is not None]
    assert alloc.held()["GPU-b"] == f"{m.consumer}/{m.nid.hex()}"
    deliver(prov.end(m.consumer, m.nid, "completed"), parties)  # the lease ends: the device comes back
    assert "GPU-b" not in alloc.held() and alloc.held()["GPU-a"] == "someone/else"


def test_only_injectable_units_are_offered(tmp_path):
    from synord.gpu_devices import GpuNode
    from test_gpu_cdi import GPU0, stand_ins, write_spec
    host = [dict(H100, id=GPU0, index=0, minor=0, cdi=f"nvidia.com/gpu={GPU0}"),
            dict(H100, id="GPU-nospec", index=1, minor=1, cdi="nvidia.com/gpu=GPU-nospec")]
    dev = stand_ins(tmp_path / "dev")
    write_spec(tmp_path / "cdi", dev, tmp_path / "lib")
    # No spec names GPU-nospec and none can be generated (no /dev/nvidiactl under dev_root).
    node = GpuNode(Store(tmp_path / "state.db"), lambda: host, [tmp_path / "cdi"], dev_root=str(tmp_path / "none"))
    assert [u["id"] for u in node.units()] == [GPU0]
    assert node.to_json()["not_injectable"] == ["GPU-nospec"]
    with pytest.raises(InsufficientCapacity):
        node.allocator.reserve("c/n", 2)
    edits = node.task_devices((GPU0,))
    assert f"CUDA_VISIBLE_DEVICES={GPU0}" in edits["env"] and edits["deviceNodes"][-1]["path"] == "/dev/nvidia0"


def test_a_spec_naming_gpus_by_index_like_nvidia_ctk_default(tmp_path):
    import yaml
    from synord.gpu_devices import GpuNode
    from test_gpu_cdi import GPU0, GPU1, stand_ins
    dev = stand_ins(tmp_path / "dev")
    (tmp_path / "cdi").mkdir()
    (tmp_path / "cdi/nvidia.yaml").write_text(yaml.safe_dump({"cdiVersion": "0.5.0", "kind": "nvidia.com/gpu",
        "devices": [{"name": str(i), "containerEdits": {"deviceNodes": [
            {"path": f"/dev/nvidia{i}", "hostPath": str(dev / f"nvidia{i}")}]}} for i in (0, 1)]
        + [{"name": "all", "containerEdits": {}}]}))
    host = [dict(H100, id=g, index=i, minor=i, cdi=f"nvidia.com/gpu={g}") for i, g in enumerate((GPU0, GPU1))]
    node = GpuNode(Store(tmp_path / "state.db"), lambda: host, [tmp_path / "cdi"], dev_root=str(tmp_path / "none"))
    assert [u["id"] for u in node.units()] == [GPU0, GPU1]
    assert node.task_devices((GPU1,))["deviceNodes"] == [
        {"path": "/dev/nvidia1", "hostPath": str(dev / "nvidia1")}]


def test_amd_units_are_metered_from_sysfs(tmp_path):
    """amdgpu's own counters (no NVML): busy percent, VRAM used, hwmon power in microwatts."""
    import trio

    from synord.gpu_devices import GpuNode
    from synord.hwprobe import gpu_units as gu, sysfs
    from test_hwprobe_sysfs import base_machine, pci, write
    root = base_machine(tmp_path)
    amd = pci(root, "0000:c1:00.0", "1002", "74a1", "0x038000", "amdgpu",
              mem_info_vram_total=str(192 * 2**30), mem_info_vram_used=str(3 << 30), gpu_busy_percent="60")
    write(amd / "drm/renderD128/dev", "226:128")
    write(amd / "hwmon/hwmon3/power1_average", "450000000")
    dev = tmp_path / "dev"
    (dev / "dri").mkdir(parents=True)
    for n in ("kfd", "dri/renderD128"):
        (dev / n).write_text("")
    host_units = gu.gpu_units(sysfs.probe_pci(root), root)
    node = GpuNode(Store(tmp_path / "state.db"), lambda: host_units, [], dev_root=str(dev))
    assert [u["id"] for u in node.units()] == ["0000:c1:00.0"]
    node.metering("aid", ("0000:c1:00.0",))
    trio.run(node.meter._sample, "aid")
    m = node.meter.meters["aid"]
    assert m.amd == {"0000:c1:00.0": str(amd)} and m.devices == {}
    assert m.samples == 1 and m.peak_memory == 3 << 30
    assert sysfs.sample_amd(m.amd) == {"0000:c1:00.0": {"utilization_percent": 60, "memory_used_bytes": 3 << 30,
                                                         "power_w": 450.0}}
    m.add(sysfs.sample_amd(m.amd), m.last + 2.0)  # two more seconds at 60 % and 450 W
    assert m.totals()["gpu_s"] >= 1.2 and m.totals()["gpu_energy_j"] >= 900.0
