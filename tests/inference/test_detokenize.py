"""``IncrementalText`` gives, after every token, exactly what decoding all the tokens gives: on the tests' byte-level
BPE tokenizer (characters of several bytes split across tokens, special tokens in the middle) and on a
SentencePiece-style one (its decoder drops the first token's leading space), and with
``clean_up_tokenization_spaces`` (a decoder that rewrites across tokens)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.tiny import CORPUS, build_tokenizer
from usf_bios.inference.detokenize import IncrementalText, decode

TEXTS = ["The capital of France is Paris.", "café — 日本語 🦊 €5, naïve façade", "a\u00e9\u20ac\U0001f98a!",
         "  two  spaces , and . punctuation ' quotes ' here", "emoji 🦊🦊 then ascii"]


def metaspace_tokenizer(folder: Path):
    """A SentencePiece-like tokenizer: Metaspace pre-tokenizer and decoder, byte fallback for unknown characters."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    raw.normalizer = normalizers.Sequence([])
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁",
                                                                                 prepend_scheme="first")])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tok")
    from transformers import AutoTokenizer

    byte_level = build_tokenizer(root / "bpe")
    # " ." becomes "." once the dot comes: the text already shown changes (transformers does this to a BPE
    # tokenizer only when told to, by this option's name)
    cleanup = AutoTokenizer.from_pretrained(root / "bpe", clean_up_tokenization_spaces=True,
                                            clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True)
    assert cleanup.decode(cleanup("a , b .", add_special_tokens=False)["input_ids"]) == "a, b."
    return {"byte-level": byte_level, "metaspace": metaspace_tokenizer(root / "sp"), "cleanup": cleanup}


def sequences(tokenizer) -> list[list[int]]:
    """The tokens of the texts (several bytes of one character in separate tokens), the same with special tokens
    between them, and random draws from the whole vocabulary (orphan bytes, special tokens, anything)."""
    found = [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in TEXTS]
    specials = tokenizer.all_special_ids
    rng = random.Random(0)
    mixed = [[t for token in seq for t in ([token, rng.choice(specials)] if rng.random() < 0.2 else [token])]
             for seq in found]
    drawn = [[rng.randrange(len(tokenizer)) for _ in range(60)] for _ in range(20)]
    return found + mixed + drawn + [specials + found[1]]


@pytest.mark.parametrize("kind", ["byte-level", "metaspace", "cleanup"])
def test_the_text_after_every_token_is_the_whole_decoding(tokenizers, kind):
    tokenizer = tokenizers[kind]
    for seq in sequences(tokenizer):
        text, tokens = IncrementalText(tokenizer), []
        for token in seq:
            tokens.append(token)
            assert text.text(tokens) == decode(tokenizer, tokens), (kind, tokens)


def test_a_split_character_shows_as_incomplete_until_its_last_byte(tokenizers):
    tokenizer = tokenizers["byte-level"]
    tokens = list(tokenizer("ok 🦊", add_special_tokens=False)["input_ids"])
    assert len(tokens) > 3   # the fox's four bytes are tokens of their own: the corpus has no such character
    text, seen = IncrementalText(tokenizer), []
    for n in range(1, len(tokens) + 1):
        seen.append(text.text(tokens[:n]))
    assert seen[-1] == "ok 🦊" and any(s.endswith("\ufffd") for s in seen[:-1])
    assert text.start > 0   # the window moved on: not every step decoded the whole text
