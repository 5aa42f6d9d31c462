"""Facts about this host: the version, its GPUs (NVML) and the disk under the storage root; and the remote places
jobs run: each remote worker, and the Ray cluster's nodes with their free GPUs."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from typing import Any

from usf_bios import __version__
from usf_bios.control.gpus import list_gpus
from usf_bios.control.schemas import DiskPublic, GpuPublic, HostFacts, RayClusterPublic, WorkerPublic
from usf_bios.storage import StorageLayout


def host_facts(layout: StorageLayout, executors: Mapping[str, Any] | None = None) -> HostFacts:
    """The host's facts, and the remote places jobs run (each asked whether it answers)."""
    disk = shutil.disk_usage(layout.root)
    workers = [WorkerPublic.model_validate(executor.health()) for executor in (executors or {}).values()
               if hasattr(executor, "health")]
    ray = next((RayClusterPublic.model_validate(executor.cluster()) for executor in (executors or {}).values()
                if hasattr(executor, "cluster")), None)
    return HostFacts(version=__version__, gpus=[GpuPublic.model_validate(g) for g in list_gpus()],
                     disk=DiskPublic(path=str(layout.root), total_gb=round(disk.total / 2**30, 2),
                                     free_gb=round(disk.free / 2**30, 2)), workers=workers, ray=ray)
