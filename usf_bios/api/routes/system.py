"""Health and host facts."""

from __future__ import annotations

from fastapi import APIRouter, Request

from usf_bios import __version__
from usf_bios.api.deps import CurrentCaller, LayoutDep
from usf_bios.control.schemas import Health, HostFacts
from usf_bios.control.system import host_facts

router = APIRouter(tags=["system"])


@router.get("/health", response_model=Health)
def health() -> Health:
    """Liveness: answers without a key."""
    return Health(version=__version__)


@router.get("/system", response_model=HostFacts)
def system(request: Request, _caller: CurrentCaller, layout: LayoutDep) -> HostFacts:
    """This host's GPUs and disk, and each remote worker with whether it answers."""
    return host_facts(layout, request.app.state.scheduler.executors)
