"""Every example's token length under a model's tokenizer, in dataset order, computed once and shared.

The job estimate (POST /api/jobs/estimate, which the web form calls after each field change) and the dataset
stats (GET /api/datasets/{id}?model=…) both need these lengths, and tokenizing a large dataset takes seconds
to minutes. The newest ``CACHE_SIZE`` results are kept, keyed by (the dataset file's SHA-256 as the file is
now, the resolved model folder, the dataset format): a changed file has a new hash and so gets new lengths. Only one computation per key runs at a time: a request asking for a key already being
computed waits for that result (``token_lengths_future`` lets an async route wait without holding a thread),
and at most ``WORKERS`` computations run at once in all.

A model's own Python code never runs in the server: tokenizers load with ``trust_remote_code=False``, and a model
whose tokenizer needs its own code is refused (field ``base_model``): its token statistics come only from the
engine, when the job runs.
"""

from __future__ import annotations

import functools

import hashlib
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from usf_bios.control.errors import Invalid
from usf_bios.control.tables import DatasetEntry, ModelEntry

CACHE_SIZE = 16                       # results kept (8 bytes per example each)
WORKERS = 2                           # tokenizations at once, over all keys
Key = tuple[str, str, str]            # (file sha256, resolved model folder, format)

_lock = threading.Lock()              # guards the dictionaries and the counter below
_cache: OrderedDict[Key, memoryview] = OrderedDict()     # least recently used first
_pending: dict[Key, Future] = {}      # computations under way
_file_hashes: OrderedDict[tuple[str, int, int, int], str] = OrderedDict()  # (path, inode, size, mtime_ns) → sha256
_executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="usf-token-lengths")
tokenizations = 0                     # datasets this process has tokenized (tests and debugging read it)


class TokenLengthsError(Invalid):
    """The dataset cannot be read in this format (field ``dataset_format``, or ``dataset`` for its file), or the
    model's tokenizer cannot tokenize it (field ``base_model``). Messages name the dataset, never its stored path."""


@dataclass(frozen=True)
class _Source:
    """What the computation needs from the two rows (plain values: it runs in another thread)."""

    dataset_name: str
    filename: str
    dataset_path: str
    model_name: str
    model_path: str
    model_source: str

    @property
    def label(self) -> str:
        return f"dataset {self.dataset_name!r}" + (f" ({self.filename})" if self.filename != self.dataset_name else "")


def token_lengths_for(dataset: DatasetEntry, model: ModelEntry, dataset_format: str = "auto") -> Sequence[int]:
    """Each example's length in tokens (chat template included, before truncation), in the file's order, as a
    read-only view shared between callers. Blocks until computed; raises TokenLengthsError."""
    return token_lengths_future(dataset, model, dataset_format).result()


def token_lengths_future(dataset: DatasetEntry, model: ModelEntry, dataset_format: str = "auto") -> Future:
    """The same as a Future: done at once from the cache, else the one computation of this key (started now or
    already under way). Reads (and hashes) the dataset file, so call it off the event loop."""
    source = _Source(dataset.name, dataset.filename, dataset.path, model.name, model.path, model.source)
    sha = _file_sha256(source)
    used_format = dataset_format
    if dataset_format == "auto" and sha == dataset.sha256:
        used_format = dataset.format   # what the upload detected from these same bytes: shares the stats' entry
    key: Key = (sha, str(Path(model.path).resolve()), used_format)
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            done: Future = Future()
            done.set_result(_cache[key])
            return done
        if key not in _pending:
            _pending[key] = _executor.submit(_compute, key, source, used_format, dataset_format)
        return _pending[key]


def _compute(key: Key, source: _Source, fmt: str, requested_format: str) -> memoryview:
    try:
        lengths = memoryview(_tokenize(source, fmt, requested_format)).toreadonly()
        with _lock:
            _cache[key] = lengths
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
        return lengths
    finally:
        with _lock:
            del _pending[key]   # a failure is not kept: the next request tries again


def _file_sha256(source: _Source) -> str:
    """The file's hash now; remembered per (path, inode, size, mtime) so an unchanged file is read once."""
    path = Path(source.dataset_path)
    try:
        info = path.stat()
        stamp = (str(path), info.st_ino, info.st_size, info.st_mtime_ns)
        with _lock:
            if stamp in _file_hashes:
                return _file_hashes[stamp]
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise TokenLengthsError("dataset", f"the file of {source.label} cannot be read ({exc.strerror})") from None
    with _lock:
        _file_hashes[stamp] = digest.hexdigest()
        while len(_file_hashes) > 4 * CACHE_SIZE:
            _file_hashes.popitem(last=False)
    return digest.hexdigest()


def _needs_own_code(folder: Path) -> bool:
    """Whether the model's tokenizer or config names Python code shipped with the model (``auto_map``)."""
    import json

    for name in ("tokenizer_config.json", "config.json"):
        try:
            if "auto_map" in json.loads((folder / name).read_text(encoding="utf-8")):
                return True
        except (OSError, ValueError):
            continue
    return False


def _tokenize(source: _Source, fmt: str, requested_format: str) -> array:
    global tokenizations
    from usf_bios.datasets.formats import DatasetError, load_dataset
    from usf_bios.datasets.stats import token_lengths
    from usf_bios.engine.model import load_tokenizer
    from usf_bios.models.sources import ResolvedModel

    try:
        examples = load_dataset(source.dataset_path, fmt).examples  # type: ignore[arg-type]
    except DatasetError as exc:   # located by the file's name, not the stored path
        where = DatasetError(source.filename, exc.reason, exc.line, unit=exc.unit)
        if requested_format == "auto":
            raise TokenLengthsError("dataset", f"dataset {source.dataset_name!r} cannot be read: {where}") from None
        raise TokenLengthsError("dataset_format",
                                f"dataset {source.dataset_name!r} is not in the {fmt} format: {where}") from None
    with _lock:
        tokenizations += 1
    try:
        tokenizer = load_tokenizer(ResolvedModel(source.model_name, Path(source.model_path), source.model_source),
                                   trust_remote_code=False)   # never the model's own code in the server process
        return array("l", token_lengths(examples, tokenizer))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds on a broken tokenizer folder
        if _needs_own_code(Path(source.model_path)):
            raise TokenLengthsError("base_model", f"model {source.model_name!r} ships its own tokenizer code, which "
                                    "the server never runs: token statistics for such a model are computed only by "
                                    "the engine, when the job runs") from None
        raise TokenLengthsError("base_model", f"model {source.model_name!r} cannot tokenize {source.label}: "
                                f"{str(exc) or type(exc).__name__}") from None


@functools.lru_cache(maxsize=32)
def _template_system_prompt(model_path: str, source: str, stamp: float) -> str | None:
    from usf_bios.engine.data import template_system_prompt
    from usf_bios.engine.model import load_tokenizer
    from usf_bios.models.sources import ResolvedModel

    try:
        return template_system_prompt(load_tokenizer(ResolvedModel(model_path, Path(model_path), source),
                                                     trust_remote_code=False))
    except Exception:  # noqa: BLE001 - a tokenizer that cannot load has its error on the token stats already
        return None


def template_system_prompt_for(model: ModelEntry) -> str | None:
    """The system prompt the model's chat template adds to a conversation without one (None when it adds none,
    or when its tokenizer needs the model's own code, which the server never runs). Cached per tokenizer file."""
    folder = Path(model.path)
    if _needs_own_code(folder):
        return None
    files = [folder / name for name in ("tokenizer_config.json", "chat_template.jinja", "chat_template.json")]
    stamp = max((f.stat().st_mtime for f in files if f.is_file()), default=0.0)
    return _template_system_prompt(str(folder), model.source, stamp)
