"""NVIDIA GPUs through NVML (`nvidia-ml-py`, import name `pynvml`).

No library, no driver or no permission means no devices, never an error.
Every field is read on its own: an old driver or a consumer card answers
NotSupported / FunctionNotFound for some of them, which leaves that field
None. NVML calls block; the daemon runs probe() in a worker thread.
"""

from __future__ import annotations

from . import known

# FP32 CUDA cores per SM by compute capability (CUDA C Programming Guide).
_CORES_PER_SM = {(3, 0): 192, (3, 2): 192, (3, 5): 192, (3, 7): 192,
                 (5, 0): 128, (5, 2): 128, (5, 3): 128,
                 (6, 0): 64, (6, 1): 128, (6, 2): 128,
                 (7, 0): 64, (7, 2): 64, (7, 5): 64,
                 (8, 0): 64, (8, 6): 128, (8, 7): 128, (8, 9): 128,
                 (9, 0): 128, (10, 0): 128, (10, 1): 128, (12, 0): 128}


def cores_per_sm(cc: tuple[int, int] | None) -> int | None:
    if cc is None:
        return None
    if cc in _CORES_PER_SM:
        return _CORES_PER_SM[cc]
    same_major = [v for (maj, _), v in _CORES_PER_SM.items() if maj == cc[0]]
    return same_major[-1] if same_major else None


def _text(v) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


class _Session:
    """nvmlInit/nvmlShutdown around a block; `ok` False when NVML is unusable."""

    def __init__(self):
        self.nv = None
        self.reason = None

    def __enter__(self):
        try:
            import pynvml
        except ImportError:
            self.reason = "nvidia-ml-py not installed"
            return self
        try:
            pynvml.nvmlInit()
            self.nv = pynvml
        except pynvml.NVMLError as e:
            self.reason = f"NVML unavailable: {e}"
        except OSError as e:  # a broken libnvidia-ml.so on the path
            self.reason = f"NVML unavailable: {e}"
        return self

    def __exit__(self, *exc):
        if self.nv is not None:
            try:
                self.nv.nvmlShutdown()
            except self.nv.NVMLError:
                pass
        return False

    def get(self, fn, *args):
        """Call one NVML getter; None when the field is not supported."""
        try:
            return getattr(self.nv, fn)(*args)
        except self.nv.NVMLError:
            return None
        except (AttributeError, TypeError):  # older pynvml lacks the wrapper
            return None


def _dynamic(s: _Session, h) -> dict:
    mem = s.get("nvmlDeviceGetMemoryInfo", h)
    util = s.get("nvmlDeviceGetUtilizationRates", h)
    power = s.get("nvmlDeviceGetPowerUsage", h)
    temp = s.get("nvmlDeviceGetTemperature", h, 0)  # NVML_TEMPERATURE_GPU
    return {
        "memory_free_bytes": mem.free if mem is not None else None,
        "memory_used_bytes": mem.used if mem is not None else None,
        "utilization_percent": util.gpu if util is not None else None,
        "memory_utilization_percent": util.memory if util is not None else None,
        "power_w": power / 1000.0 if power is not None else None,
        "temperature_c": temp,
    }


def _device(s: _Session, index: int, driver: str | None) -> dict | None:
    h = s.get("nvmlDeviceGetHandleByIndex", index)
    if h is None:
        return None
    name = s.get("nvmlDeviceGetName", h)
    name = _text(name) if name is not None else f"NVIDIA GPU {index}"
    pci = s.get("nvmlDeviceGetPciInfo", h)
    pci_id = None
    bus_id = None
    if pci is not None:
        dev_vendor = pci.pciDeviceId
        pci_id = f"{dev_vendor & 0xFFFF:04x}:{dev_vendor >> 16:04x}"
        bus_id = _text(pci.busId)
    entry = known.match(name, pci_id)
    mem = s.get("nvmlDeviceGetMemoryInfo", h)
    cc = s.get("nvmlDeviceGetCudaComputeCapability", h)
    cc = tuple(cc) if cc is not None else None
    sm_clock = s.get("nvmlDeviceGetMaxClockInfo", h, 1)   # NVML_CLOCK_SM
    mem_clock = s.get("nvmlDeviceGetMaxClockInfo", h, 2)  # NVML_CLOCK_MEM
    bus_width = s.get("nvmlDeviceGetMemoryBusWidth", h)
    cores = s.get("nvmlDeviceGetNumGpuCores", h)
    if not cores:
        attrs = s.get("nvmlDeviceGetAttributes", h)  # MIG-era drivers only
        sms = attrs.multiprocessorCount if attrs is not None else None
        sms = sms or (entry or {}).get("sm_count")
        per_sm = cores_per_sm(cc)
        cores = sms * per_sm if sms and per_sm else None
    mig = s.get("nvmlDeviceGetMigMode", h)
    enforced = s.get("nvmlDeviceGetEnforcedPowerLimit", h)

    tp = known.throughput(entry)
    if cores and sm_clock:
        tp["fp32_gflops"] = round(cores * 2 * sm_clock / 1000.0, 1)
        tp["source"] = "computed"
    if mem_clock and bus_width:
        # DDR: two transfers per clock; MHz * bits -> GB/s.
        tp["bandwidth_gbs"] = round(mem_clock * 2 * bus_width / 8 / 1000.0, 1)
    uuid = s.get("nvmlDeviceGetUUID", h)
    dev = {
        "kind": "gpu",
        "vendor": "NVIDIA",
        "model": name,
        "memory_bytes": mem.total if mem is not None else (entry or {}).get("memory_bytes"),
        "throughput": tp,
        "index": index,
        "uuid": _text(uuid) if uuid is not None else None,
        "minor_number": s.get("nvmlDeviceGetMinorNumber", h),  # its /dev/nvidiaN
        "pci_bus_id": bus_id,
        "pci_id": pci_id,
        "known": entry["model"] if entry else None,
        "slug": entry["slug"] if entry else None,
        "tier": entry["tier"] if entry else None,
        "compute_capability": f"{cc[0]}.{cc[1]}" if cc else None,
        "cuda_cores": cores,
        "max_sm_clock_mhz": sm_clock,
        "max_mem_clock_mhz": mem_clock,
        "memory_bus_width_bits": bus_width,
        "pcie_gen": s.get("nvmlDeviceGetCurrPcieLinkGeneration", h),
        "pcie_max_gen": s.get("nvmlDeviceGetMaxPcieLinkGeneration", h),
        "pcie_width": s.get("nvmlDeviceGetCurrPcieLinkWidth", h),
        "mig_mode": {"current": bool(mig[0]), "pending": bool(mig[1])} if mig is not None else None,
        "power_limit_w": enforced / 1000.0 if enforced is not None else None,
        "driver_version": driver,
        "usable": True,
    }
    dev.update(_dynamic(s, h))
    if mig is not None and mig[0]:
        dev["mig_devices"] = _mig_devices(s, h)
    return dev


def _mig_devices(s: _Session, h) -> list[dict]:
    """The MIG instances of a GPU in MIG mode (their profile from the name NVML gives
    them, "... MIG 1g.10gb"); empty slots answer NotFound and are skipped."""
    out = []
    for i in range(s.get("nvmlDeviceGetMaxMigDeviceCount", h) or 0):
        m = s.get("nvmlDeviceGetMigDeviceHandleByIndex", h, i)
        if m is None:
            continue
        name = s.get("nvmlDeviceGetName", m)
        name = _text(name) if name is not None else ""
        uuid = s.get("nvmlDeviceGetUUID", m)
        mem = s.get("nvmlDeviceGetMemoryInfo", m)
        out.append({"uuid": _text(uuid) if uuid is not None else None,
                    "profile": name.rsplit(" MIG ", 1)[1] if " MIG " in name else None,
                    "memory_bytes": mem.total if mem is not None else None,
                    # GPU / compute instance ids: which /dev/nvidia-caps nodes grant it (CDI)
                    "gi": s.get("nvmlDeviceGetGpuInstanceId", m), "ci": s.get("nvmlDeviceGetComputeInstanceId", m)})
    return out


def probe_nvidia() -> tuple[list[dict], str | None]:
    """(devices, reason when none could be probed)."""
    with _Session() as s:
        if s.nv is None:
            return [], s.reason
        count = s.get("nvmlDeviceGetCount")
        if not count:
            return [], "NVML reports no GPU"
        driver = s.get("nvmlSystemGetDriverVersion")
        driver = _text(driver) if driver is not None else None
        devices = [d for i in range(count) if (d := _device(s, i, driver)) is not None]
        return devices, None


def refresh(devices: list[dict]) -> None:
    """Update utilisation / free memory / power of NVML devices in place."""
    gpus = [d for d in devices if d.get("kind") == "gpu" and d.get("vendor") == "NVIDIA" and "index" in d]
    if not gpus:
        return
    with _Session() as s:
        if s.nv is None:
            return
        for d in gpus:
            h = s.get("nvmlDeviceGetHandleByIndex", d["index"])
            if h is None:
                continue
            uuid = s.get("nvmlDeviceGetUUID", h)
            if d.get("uuid") and uuid is not None and _text(uuid) != d["uuid"]:
                continue  # device order changed (hot-plug, reset): wait for a full probe
            d.update(_dynamic(s, h))


def sample(indexes: dict[str, int]) -> dict[str, dict]:
    """Utilisation, memory used and power of the devices ``{uuid: index}`` now (one NVML
    session); a device whose UUID no longer sits at its index is left out."""
    out: dict[str, dict] = {}
    with _Session() as s:
        if s.nv is None:
            return out
        for uuid, index in indexes.items():
            h = s.get("nvmlDeviceGetHandleByIndex", index)
            if h is None:
                continue
            got = s.get("nvmlDeviceGetUUID", h)
            if got is not None and _text(got) != uuid and not uuid.startswith("MIG-"):
                continue
            out[uuid] = _dynamic(s, h)
    return out
