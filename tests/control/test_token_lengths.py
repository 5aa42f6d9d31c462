"""The shared token-length cache: dataset order, one computation per key, a changed file, errors, the bound."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import chat_rows, write_jsonl
from usf_bios.control import token_lengths
from usf_bios.control.tables import DatasetEntry, ModelEntry
from usf_bios.control.token_lengths import TokenLengthsError, token_lengths_for, token_lengths_future
from usf_bios.datasets.formats import load_dataset
from usf_bios.datasets.stats import token_lengths as direct_lengths
from usf_bios.engine.model import load_tokenizer
from usf_bios.models.sources import ResolvedModel


@pytest.fixture
def model(tiny_model_template: Path, tmp_path: Path) -> ModelEntry:
    folder = shutil.copytree(tiny_model_template, tmp_path / "models" / "test--tiny")   # a key of its own
    return ModelEntry(name="tiny", source="local", path=str(folder))


def dataset_entry(path: Path, name: str = "chat") -> DatasetEntry:
    loaded = load_dataset(path)
    return DatasetEntry(name=name, filename=path.name, path=str(path), format=loaded.format,
                        rows=len(loaded.examples), size_bytes=path.stat().st_size, sha256=loaded.sha256)


def expected(path: Path, model: ModelEntry) -> list[int]:
    tokenizer = load_tokenizer(ResolvedModel(model.name, Path(model.path), "local"), trust_remote_code=False)
    return direct_lengths(load_dataset(path).examples, tokenizer)


def test_lengths_in_dataset_order_computed_once_for_requests_at_the_same_time(model: ModelEntry, tmp_path: Path):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_rows(2000))
    entry = dataset_entry(path)
    before = token_lengths.tokenizations
    first = token_lengths_future(entry, model)
    second = token_lengths_future(entry, model, "auto")            # while the first one is still tokenizing
    assert second is first and not first.done()
    lengths = first.result(timeout=120)
    assert list(lengths) == expected(path, model) and list(lengths) != sorted(lengths)
    assert token_lengths_for(entry, model, "messages") is lengths  # 'auto' is the format detected at upload
    assert token_lengths.tokenizations == before + 1
    with pytest.raises(TypeError):
        lengths[0] = 1                                              # shared, so read-only


def test_a_changed_file_gets_new_lengths(model: ModelEntry, tmp_path: Path):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_rows(30))
    entry = dataset_entry(path)
    assert len(token_lengths_for(entry, model)) == 30
    write_jsonl(path, chat_rows(31))
    assert list(token_lengths_for(entry, model)) == expected(path, model)


def test_errors_name_the_field_and_the_dataset_not_its_path(model: ModelEntry, tmp_path: Path):
    path = write_jsonl(tmp_path / "stored" / "chat.jsonl", chat_rows(5))
    entry = dataset_entry(path, name="support")
    with pytest.raises(TokenLengthsError) as wrong:
        token_lengths_for(entry, model, "alpaca")
    assert wrong.value.field == "dataset_format" and str(tmp_path) not in wrong.value.message
    assert wrong.value.message.startswith("dataset 'support' is not in the alpaca format: chat.jsonl:1:")

    broken = ModelEntry(name="empty", source="local", path=str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    before = token_lengths.tokenizations
    for _ in range(2):   # a failure is not cached: the second request tries again
        with pytest.raises(TokenLengthsError) as unusable:
            token_lengths_for(entry, broken)
        assert unusable.value.field == "base_model" and "model 'empty' cannot tokenize dataset 'support'" in str(unusable.value)
    assert token_lengths.tokenizations == before + 2

    path.unlink()
    with pytest.raises(TokenLengthsError) as gone:
        token_lengths_for(entry, model)
    assert gone.value.field == "dataset" and str(tmp_path) not in gone.value.message


def test_the_cache_keeps_the_newest_results(model: ModelEntry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(token_lengths, "CACHE_SIZE", 2)
    entries = [dataset_entry(write_jsonl(tmp_path / f"d{i}.jsonl", chat_rows(3 + i))) for i in range(3)]
    before = token_lengths.tokenizations
    for entry in entries:
        token_lengths_for(entry, model)
    token_lengths_for(entries[2], model)
    assert token_lengths.tokenizations == before + 3
    token_lengths_for(entries[0], model)                            # the oldest one was dropped
    assert token_lengths.tokenizations == before + 4
    assert len(token_lengths._cache) <= 2
