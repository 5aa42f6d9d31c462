"""A job's datasets: the one ``dataset``, or a ``datasets`` mixture with sampling weights, each file found and
validated on its own (a fault names its file and line)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from usf_bios.datasets.formats import DatasetFormat, LoadedDataset, load_dataset
from usf_bios.datasets.locate import locate_dataset
from usf_bios.storage import StorageLayout


@dataclass(frozen=True)
class DatasetMixture:
    """The loaded files with their weights, in the spec's order."""

    parts: tuple[tuple[LoadedDataset, float], ...]

    @property
    def weighted(self) -> bool:
        """False for one file at weight 1: trained exactly as a plain ``dataset``."""
        return len(self.parts) > 1 or self.parts[0][1] != 1.0

    @property
    def format(self) -> str:
        return ", ".join(dict.fromkeys(part.format for part, _ in self.parts))

    @property
    def sha256(self) -> str:
        """What a resume compares: the file's hash for a plain dataset, else a hash of each file's hash and weight."""
        if not self.weighted:
            return self.parts[0][0].sha256
        pairs = [[part.sha256, weight] for part, weight in self.parts]
        return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()

    @property
    def example_count(self) -> int:
        return sum(len(part.examples) for part, _ in self.parts)


def load_mixture(refs: list[tuple[str, float]], fmt: DatasetFormat, layout: StorageLayout) -> DatasetMixture:
    """Every dataset of ``refs`` ((name, weight) pairs: ``JobSpec.dataset_refs()``), located and validated."""
    return DatasetMixture(tuple((load_dataset(locate_dataset(name, layout), fmt), weight) for name, weight in refs))
