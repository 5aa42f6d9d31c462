"""Tokenization, loss masks, truncation and packing."""

from __future__ import annotations

import dataclasses

from pathlib import Path

import pytest
import torch

from tests.tiny import build_tiny_model
from usf_bios.datasets.formats import Example, Message
from usf_bios.engine.data import IGNORE, TokenizationError, TrainingData, collate, encode_example, pack_rows
from usf_bios.engine.loss import token_losses

CONVERSATION = Example((Message("system", "Answer briefly."), Message("user", "What is 2?"),
                        Message("assistant", "The answer is 2."), Message("user", "And 3?"),
                        Message("assistant", "Three.")), templated=True, line=7)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", hidden=48)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


def trained_text(tokenizer, item) -> str:
    return tokenizer.decode([item.input_ids[t + 1] for t, target in enumerate(item.targets) if target != IGNORE])


def test_loss_only_on_assistant_turns(tiny):
    _, tokenizer = tiny
    item = encode_example(CONVERSATION, tokenizer, 512, train_on_inputs=False)
    assert tokenizer.decode(item.input_ids).startswith("<|im_start|>system\nAnswer briefly.")
    assert trained_text(tokenizer, item) == "The answer is 2.<|im_end|>\nThree.<|im_end|>\n"
    assert item.line == 7 and not item.truncated
    assert item.targets[-1] == IGNORE  # the last position predicts nothing


def test_train_on_inputs_trains_every_next_token(tiny):
    _, tokenizer = tiny
    item = encode_example(CONVERSATION, tokenizer, 512, train_on_inputs=True)
    assert item.targets == item.input_ids[1:] + [IGNORE]


def test_truncation_to_max_seq_length(tiny):
    _, tokenizer = tiny
    full = encode_example(CONVERSATION, tokenizer, 512, train_on_inputs=False)
    cut = encode_example(CONVERSATION, tokenizer, 20, train_on_inputs=False)
    assert len(full.input_ids) > 20 and len(cut.input_ids) == 20 and cut.truncated
    assert cut.input_ids == full.input_ids[:20]


def test_chat_format_without_template_is_a_clear_error(tmp_path: Path):
    from transformers import AutoTokenizer

    folder = build_tiny_model(tmp_path / "plain", chat_template=None)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with pytest.raises(TokenizationError, match="no chat template"):
        encode_example(CONVERSATION, tokenizer, 512, train_on_inputs=False)
    # plain-text formats need no template
    text = Example((Message("assistant", "The quick brown fox."),), templated=False, line=1)
    assert tokenizer.decode(encode_example(text, tokenizer, 512, False).input_ids) == "The quick brown fox.<|im_end|>"


def test_prompt_completion_trains_on_the_completion_only(tiny):
    _, tokenizer = tiny
    example = Example((Message("user", "Capital of France?"), Message("assistant", " Paris.")), templated=False, line=3)
    item = encode_example(example, tokenizer, 512, train_on_inputs=False)
    assert tokenizer.decode(item.input_ids) == "Capital of France? Paris.<|im_end|>"
    assert trained_text(tokenizer, item) == " Paris.<|im_end|>"


def test_text_format_trains_on_everything_after_the_first_token(tiny):
    _, tokenizer = tiny
    item = encode_example(Example((Message("assistant", "The quick brown fox."),), False, 1), tokenizer, 512, False)
    assert item.targets == item.input_ids[1:] + [IGNORE]
    assert tokenizer.decode(item.input_ids).endswith("<|im_end|>")


def test_pack_rows_places_every_example_once_within_capacity():
    lengths = [5, 17, 3, 9, 12, 1, 20, 7, 7, 4]
    rows = pack_rows(lengths, capacity=20)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 20 for row in rows)
    assert len(rows) == 5  # 85 tokens in rows of 20: the fewest possible
    assert pack_rows(lengths, capacity=20) == rows  # deterministic


def test_collate_restarts_positions_and_pads_without_loss(tiny):
    _, tokenizer = tiny
    a = encode_example(CONVERSATION, tokenizer, 512, False)
    b = encode_example(Example((Message("assistant", "fox"),), False, 2), tokenizer, 512, False)
    batch = collate([[a, b], [b]], pad_id=0)
    width = len(a.input_ids) + len(b.input_ids)
    assert batch.input_ids.shape == (2, width)
    assert batch.position_ids[0].tolist() == list(range(len(a.input_ids))) + list(range(len(b.input_ids)))
    assert batch.targets[1, len(b.input_ids):].eq(IGNORE).all()
    assert batch.real_tokens == width + len(b.input_ids)


def test_packed_row_gives_the_same_per_example_loss_as_examples_alone(tiny):
    model, tokenizer = tiny
    examples = [CONVERSATION,
                Example((Message("user", "Who wrote the report?"), Message("assistant", "The analyst.")), True, 2),
                Example((Message("user", "Capital of France?"), Message("assistant", "Paris.")), True, 3)]
    items = [encode_example(ex, tokenizer, 512, False) for ex in examples]
    with torch.no_grad():
        packed = token_losses(model, collate([items], pad_id=0))[0]
        offset = 0
        for item in items:
            alone = token_losses(model, collate([[item]], pad_id=0))[0]
            together = packed[offset:offset + len(item.input_ids)]
            torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
            assert alone.sum() > 0
            offset += len(item.input_ids)
        # and the padded batch of separate rows agrees too
        padded = token_losses(model, collate([[it] for it in items], pad_id=0))
        for row, item in enumerate(items):
            torch.testing.assert_close(padded[row, :len(item.input_ids)], packed[sum(len(i.input_ids) for i in items[:row]):][:len(item.input_ids)], rtol=1e-5, atol=1e-6)


def test_packing_would_differ_if_examples_attended_to_each_other(tiny):
    """Guard for the test above: positions that do not restart let the second example see the first."""
    model, tokenizer = tiny
    a = encode_example(CONVERSATION, tokenizer, 512, False)
    b = encode_example(Example((Message("user", "Hi"), Message("assistant", "Hello there.")), True, 2), tokenizer, 512, False)
    batch = collate([[a, b]], pad_id=0)
    continuous = dataclasses.replace(batch, position_ids=torch.arange(batch.input_ids.shape[1])[None])
    with torch.no_grad():
        alone = token_losses(model, collate([[b]], pad_id=0))[0]
        leaked = token_losses(model, continuous)[0, len(a.input_ids):]
    assert not torch.allclose(leaked, alone, atol=1e-4)


def test_validation_split_and_epoch_order_are_deterministic(tiny):
    _, tokenizer = tiny
    items = [encode_example(Example((Message("assistant", f"fox {i}"),), False, i), tokenizer, 64, False) for i in range(40)]
    make = lambda: TrainingData(items, batch_size=4, max_seq_length=64, packing=False, val_split=0.1, seed=3, pad_id=0)  # noqa: E731
    one, two = make(), make()
    assert [e.line for e in one.val_examples] == [e.line for e in two.val_examples] and len(one.val_examples) == 4
    assert one.epoch_order(0) == two.epoch_order(0) and one.epoch_order(0) != one.epoch_order(1)
    assert {e.line for e in one.val_examples}.isdisjoint(e.line for e in one.train_examples)
