"""GPUs of this host through NVML (nvidia-ml-py); an empty list where there is none."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total_gb: float
    memory_used_gb: float
    utilization_percent: int


def list_gpus() -> list[GpuInfo]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            try:
                utilization = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except pynvml.NVMLError:
                utilization = 0
            gpus.append(GpuInfo(index, name.decode() if isinstance(name, bytes) else name,
                                round(memory.total / 2**30, 2), round(memory.used / 2**30, 2), utilization))
        return gpus
    finally:
        pynvml.nvmlShutdown()
