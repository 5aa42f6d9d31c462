"""Dataset loading: JSONL / JSON / CSV files in five formats, validated into one internal shape."""

from usf_bios.datasets.formats import (
    FORMATS,
    DatasetError,
    DatasetFormat,
    Example,
    LoadedDataset,
    Message,
    Role,
    detect_format,
    load_dataset,
    to_example,
)
from usf_bios.datasets.readers import SUPPORTED_SUFFIXES, read_records

__all__ = [
    "FORMATS",
    "SUPPORTED_SUFFIXES",
    "DatasetError",
    "DatasetFormat",
    "Example",
    "LoadedDataset",
    "Message",
    "Role",
    "detect_format",
    "load_dataset",
    "read_records",
    "to_example",
]
