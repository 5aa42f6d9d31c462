"""Find the file behind the spec's ``dataset``: a path, or a dataset registered under data/datasets/."""

from __future__ import annotations

from pathlib import Path

from usf_bios.datasets.readers import SUPPORTED_SUFFIXES
from usf_bios.storage import PathOutsideRoot, StorageLayout, confine


class DatasetNotFound(LookupError):
    pass


def locate_dataset(name: str, layout: StorageLayout) -> Path:
    """A file path as given, else the data file inside ``data/datasets/{name}/``."""
    direct = Path(name).expanduser()
    if direct.is_file():
        return direct.resolve()
    try:
        folder = confine(layout.datasets, name)
    except PathOutsideRoot:
        raise DatasetNotFound(f"dataset {name!r} is not a file and not a registered dataset") from None
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
        if len(files) == 1:
            return files[0]
    raise DatasetNotFound(f"dataset {name!r} not found: no such file, and no registered dataset of that name "
                          f"under {layout.datasets}")
