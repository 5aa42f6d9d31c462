"""Presets: partial job specs as YAML files named ``<model>_<method>.yaml`` in this folder, each with a header
comment (``# Label: summary`` and the exact command that runs it) and a comment on every key. The CLI
(``usf-bios train --preset NAME SPEC``), the REST API (``GET /api/presets``) and the web form read the same files.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

FOLDER = Path(__file__).parent
DEFAULT_PRESET = "any_lora"


class PresetError(ValueError):
    """An unknown preset name, or a preset file that is not a partial job spec."""


@dataclass(frozen=True)
class Preset:
    name: str
    label: str
    summary: str
    command: str
    fields: dict[str, Any]   # the partial spec

    def apply(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The preset's fields with ``spec``'s on top (a field the spec sets wins, group by group; a spec's
        ``datasets`` replaces a preset's ``dataset``, and the other way round)."""
        merged = merge(self.fields, spec)
        for given, other in (("datasets", "dataset"), ("dataset", "datasets")):
            if given in spec and other not in spec:
                merged.pop(other, None)
        return merged


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read(path: Path) -> Preset:
    text = path.read_text(encoding="utf-8")
    header = [line[1:].strip() for line in text.splitlines() if line.startswith("#")]
    title = header[0] if header else ""
    label, _, summary = title.partition(": ")
    command = next((line for line in header if line.startswith("usf-bios ")), "")
    fields = yaml.safe_load(text)
    if not label or not summary or not command or not isinstance(fields, dict):
        raise PresetError(f"{path.name}: a preset needs a '# Label: summary' first line, a '#   usf-bios …' command "
                          "line and a mapping of spec fields")
    return Preset(path.stem, label, summary, command, fields)


@lru_cache(maxsize=1)
def load_presets() -> dict[str, Preset]:
    """Every preset in this folder by name, the default first, then by name."""
    found = {p.stem: _read(p) for p in sorted(FOLDER.glob("*.yaml"))}
    return dict(sorted(found.items(), key=lambda item: (item[0] != DEFAULT_PRESET, item[0])))


def get_preset(name: str) -> Preset:
    presets = load_presets()
    if name not in presets:
        raise PresetError(f"no preset {name!r}; the presets are: {', '.join(presets)}")
    return presets[name]
