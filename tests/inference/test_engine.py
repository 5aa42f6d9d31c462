"""The inference engine on a tiny real Llama and real peft adapters: one base load for many adapters, switching
without reloading, mixed-adapter batches equal to one-by-one answers, the LRU, the bounded queue, idle unloading,
stop strings, seeds, streaming (each row's stream equal to decoding its whole text after every token)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from tests.tiny import build_tiny_model
from usf_bios.inference.detokenize import IncrementalText
from usf_bios.inference.engine import EngineUnavailable, Generation, InferenceEngine, QueueFull
from usf_bios.inference.generate import Row, _advance
from usf_bios.inference.loaded import BaseKey, LoadedBase, Target
from usf_bios.inference.sampling import RequestError, SamplingParams, find_stop, safe_length

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = SamplingParams(temperature=0, max_tokens=12)


def make_adapter(base: Path, folder: Path, seed: int) -> str:
    """A LoRA adapter with random (non-zero) weights, saved by peft as the engine saves its own."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[BaseKey, str, str]:
    root = tmp_path_factory.mktemp("serve")
    base = build_tiny_model(root / "tiny", hidden=64, layers=2)
    return BaseKey(str(base)), make_adapter(base, root / "a", 1), make_adapter(base, root / "b", 2)


@pytest.fixture
def engine():
    engines: list[InferenceEngine] = []

    def make(**kwargs) -> InferenceEngine:
        engines.append(InferenceEngine(**kwargs))
        return engines[-1]

    yield make
    for e in engines:
        e.close()


def ask(engine: InferenceEngine, target: Target, params: SamplingParams = GREEDY, **what) -> str:
    return engine.submit(target, params=params, **(what or {"messages": QUESTION})).result().text


def test_two_adapters_answer_differently_on_one_base_loaded_once(tiny, engine):
    base, a, b = tiny
    eng = engine()
    answers = {name: ask(eng, Target(base, folder)) for name, folder in (("base", None), ("a", a), ("b", b))}
    assert len(set(answers.values())) == 3, answers
    # switching back and forth costs no load: the same answers, one base load, each adapter loaded once
    for _ in range(2):
        assert ask(eng, Target(base, b)) == answers["b"]
        assert ask(eng, Target(base, a)) == answers["a"]
        assert ask(eng, Target(base)) == answers["base"]
    state = eng.describe()
    assert [s["loads"] for s in state["bases"]] == [1]
    assert state["bases"][0]["adapter_loads"] == 2 and state["bases"][0]["adapter_evictions"] == 0


def test_a_batch_of_mixed_adapters_answers_as_one_by_one(tiny, engine):
    base, a, b = tiny
    eng = engine()
    targets = [Target(base, a), Target(base), Target(base, b), Target(base, a)]
    lengths = [SamplingParams(temperature=0, max_tokens=n) for n in (12, 4, 9, 6)]   # rows leave the batch early
    alone = [ask(eng, t, p) for t, p in zip(targets, lengths)]
    batches = eng.batches
    with eng._cond:   # the worker cannot take any before all four wait: they go as one batch
        gens = [eng.submit(t, messages=QUESTION, params=p) for t, p in zip(targets, lengths)]
    assert [g.result().text for g in gens] == alone
    assert eng.batches == batches + 1


def test_the_lru_keeps_at_most_the_limit_and_reloads_what_it_dropped(tiny, engine):
    base, a, b = tiny
    eng = engine(max_adapters=1)
    first = [ask(eng, Target(base, a)), ask(eng, Target(base, b))]
    assert [ask(eng, Target(base, a)), ask(eng, Target(base, b))] == first
    state = eng.describe()["bases"][0]
    assert state["adapters"] == [b] and state["adapter_loads"] == 4 and state["adapter_evictions"] == 3


def test_a_full_queue_refuses_at_once(tiny, engine):
    base, _, _ = tiny
    eng = engine(queue_size=1)
    with eng._cond:   # the worker is held off: the first request waits, the second finds the queue full
        waiting = eng.submit(Target(base), messages=QUESTION, params=GREEDY)
        with pytest.raises(QueueFull, match="1 requests are waiting"):
            eng.submit(Target(base), messages=QUESTION, params=GREEDY)
    assert waiting.result().completion_tokens > 0
    eng.close()
    with pytest.raises(EngineUnavailable):
        eng.submit(Target(base), messages=QUESTION, params=GREEDY)


def test_an_idle_base_is_unloaded_and_loads_again_on_use(tiny, engine):
    base, a, _ = tiny
    eng = engine(idle_s=0.3)
    answer = ask(eng, Target(base, a))
    deadline = time.monotonic() + 10
    while eng.describe()["bases"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert eng.describe()["bases"] == []
    assert ask(eng, Target(base, a)) == answer
    assert eng.base_loads[base] == 2


def test_stop_strings_cut_the_text_and_streaming_yields_the_same_text(tiny, engine):
    base, a, _ = tiny
    eng = engine()
    params = SamplingParams(temperature=0, max_tokens=24)
    full = eng.submit(Target(base, a), messages=QUESTION, params=params).result()
    assert full.finish_reason == "length" and full.completion_tokens == 24 and len(full.text) > 8
    pieces = [item[1] for item in eng.submit(Target(base, a), messages=QUESTION, params=params) if item[0] == "text"]
    assert len(pieces) > 1 and "".join(pieces) == full.text
    stop = full.text[5:8]
    cut = eng.submit(Target(base, a), messages=QUESTION, params=SamplingParams(temperature=0, max_tokens=24,
                                                                              stop=(stop,))).result()
    assert (cut.text, cut.finish_reason) == (full.text[:full.text.find(stop)], "stop")


def test_a_seed_repeats_a_sampled_answer(tiny, engine):
    base, _, b = tiny
    eng = engine()

    def sample(seed: int) -> str:
        return ask(eng, Target(base, b), SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=seed))

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1


def test_requests_that_cannot_be_served_say_why(tiny, engine, tmp_path):
    base, _, _ = tiny
    eng = engine()
    with pytest.raises(RequestError, match="max_tokens: 5000 tokens do not fit"):
        eng.submit(Target(base), messages=QUESTION, params=SamplingParams(max_tokens=5000)).result()
    with pytest.raises(RequestError, match="adapter's files are missing"):
        eng.submit(Target(base, str(tmp_path)), messages=QUESTION, params=GREEDY).result()
    with pytest.raises(EngineUnavailable, match="could not be loaded"):
        eng.submit(Target(BaseKey(str(tmp_path / "none"))), prompt="hi", params=GREEDY).result()
    with pytest.raises(RequestError, match="temperature"):
        SamplingParams(temperature=3)
    # a plain completion of a prompt works on the same base
    assert Generation.collect(eng.submit(Target(base), prompt="The quick", params=GREEDY)).completion_tokens > 0


def test_safe_length_holds_back_a_stop_strings_start():
    assert safe_length("hello wor", ("world",)) == 6
    assert safe_length("hello", ("xyz",)) == 5
    assert safe_length("ab\ufffd", ()) == 2


def delivered_by_whole_decoding(tokenizer, eos_ids: set[int], tokens: list[int], params: SamplingParams,
                                max_new: int) -> list[tuple]:
    """What a row streams when its whole text is decoded again after every token (the engine's rule before it
    decoded incrementally): the safe part of the text, the rest at the end, cut at the first stop string."""
    items, kept, sent = [], [], 0
    for token in tokens:
        finish = "stop" if token in eos_ids else None
        kept += [] if finish else [token]
        text = tokenizer.decode(kept, skip_special_tokens=True)
        cut = find_stop(text, params.stop)
        if cut is not None:
            text, finish = text[:cut], "stop"
        finish = finish or ("length" if len(kept) >= max_new else None)
        end = len(text) if finish else safe_length(text, params.stop)
        if end > sent:
            items.append(("text", text[sent:end]))
            sent = end
        if finish:
            return items + [("done", finish, len(kept))]
    return items


@pytest.mark.parametrize("answer, stop, max_new", [
    ("The capital of France is Paris. café 日本 🦊🦊 €5", (), 64),            # characters of several tokens
    ("The capital of France is Paris.", ("al of Fr",), 64),                   # a stop string across tokens
    ("hello 🦊 world, the quick brown fox", ("🦊 w", "xyz"), 64),            # … that begins inside a character
    ("answer: 日本語 and more", ("本語",), 64),
    ("ok 🦊 and then", (), 3),                                                # the length ends inside a character
    ("the lazy dog jumps", ("dog",), 64),
])
def test_a_streamed_row_delivers_what_whole_decoding_delivers(tiny, answer, stop, max_new):
    base = LoadedBase(tiny[0], 2, torch.device("cpu"))
    tokens = list(base.tokenizer(answer, add_special_tokens=False)["input_ids"]) + [min(base.eos_ids)]
    params = SamplingParams(temperature=0, stop=stop)
    gen = Generation(Target(tiny[0]), None, "", params)
    row = Row(gen, [], None, params, max_new, decoded=IncrementalText(base.tokenizer))
    for token in tokens:
        _advance(row, token, base)
        if row.finish:
            break
    items = [item for item in iter(gen)]
    assert items == delivered_by_whole_decoding(base.tokenizer, base.eos_ids, tokens, params, max_new)
    assert len([i for i in items if i[0] == "text"]) > 1


def test_rows_that_end_mid_batch_stream_what_they_stream_alone(tiny, engine):
    base, a, b = tiny
    eng = engine()
    free = eng.submit(Target(base, a), messages=QUESTION, params=SamplingParams(temperature=0, max_tokens=20)).result()
    asks = [(Target(base, a), SamplingParams(temperature=0, max_tokens=20, stop=(free.text[6:9],))),   # a stop
            (Target(base, b), SamplingParams(temperature=0.8, top_p=0.9, max_tokens=16, seed=3)),      # sampled
            (Target(base), SamplingParams(temperature=0, max_tokens=5)),                                # short
            (Target(base, a), SamplingParams(temperature=1.0, max_tokens=20, seed=11, stop=("e",)))]

    def stream(gen: Generation) -> list[tuple]:
        return [item for item in gen if item[0] in ("text", "done")]

    alone = [stream(eng.submit(t, messages=QUESTION, params=p)) for t, p in asks]
    with eng._cond:   # one batch: each row leaves it at its own end
        gens = [eng.submit(t, messages=QUESTION, params=p) for t, p in asks]
    assert [stream(g) for g in gens] == alone
    assert alone[0][-1][1] == "stop" and alone[2][-1] == ("done", "length", 5)
