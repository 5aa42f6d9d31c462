"""Health and host facts."""

from __future__ import annotations

import shutil

from fastapi import APIRouter

from usf_bios import __version__
from usf_bios.api.deps import CurrentCaller, LayoutDep
from usf_bios.control.gpus import list_gpus
from usf_bios.storage import StorageLayout

router = APIRouter(tags=["system"])


@router.get("/health")
def health() -> dict:
    """Liveness: answers without a key."""
    return {"status": "ok", "version": __version__}


def host_facts(layout: StorageLayout) -> dict:
    """The version, this host's GPUs (NVML) and the disk under the storage root."""
    disk = shutil.disk_usage(layout.root)
    return {"version": __version__, "gpus": [g.as_dict() for g in list_gpus()],
            "disk": {"path": str(layout.root), "total_gb": round(disk.total / 2**30, 2),
                     "free_gb": round(disk.free / 2**30, 2)}}


@router.get("/system")
def system(_caller: CurrentCaller, layout: LayoutDep) -> dict:
    return host_facts(layout)
