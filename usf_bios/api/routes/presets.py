"""Presets: the partial job specs the CLI, this API and the web form share (usf_bios/presets/*.yaml)."""

from __future__ import annotations

from fastapi import APIRouter

from usf_bios.api.deps import CurrentCaller
from usf_bios.control.schemas import PresetPublic
from usf_bios.presets import load_presets

router = APIRouter(tags=["presets"])


@router.get("/presets", response_model=list[PresetPublic])
def list_presets(_caller: CurrentCaller) -> list[PresetPublic]:
    """Every preset, the default first; `fields` is the partial spec a job's own fields override."""
    return [PresetPublic(name=p.name, label=p.label, summary=p.summary, command=p.command, fields=p.fields)
            for p in load_presets().values()]
