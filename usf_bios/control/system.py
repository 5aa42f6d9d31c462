"""Facts about this host: the version, its GPUs (NVML) and the disk under the storage root."""

from __future__ import annotations

import shutil

from usf_bios import __version__
from usf_bios.control.gpus import list_gpus
from usf_bios.control.schemas import DiskPublic, GpuPublic, HostFacts
from usf_bios.storage import StorageLayout


def host_facts(layout: StorageLayout) -> HostFacts:
    disk = shutil.disk_usage(layout.root)
    return HostFacts(version=__version__, gpus=[GpuPublic.model_validate(g) for g in list_gpus()],
                     disk=DiskPublic(path=str(layout.root), total_gb=round(disk.total / 2**30, 2),
                                     free_gb=round(disk.free / 2**30, 2)))
