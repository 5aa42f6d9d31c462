"""Health and host facts."""

from __future__ import annotations

from fastapi import APIRouter

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
def system(_caller: CurrentCaller, layout: LayoutDep) -> HostFacts:
    return host_facts(layout)
