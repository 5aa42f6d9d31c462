from usf_bios.bench.synthetic import example_lengths, synthetic_examples
from usf_bios.engine.data import IGNORE


def test_lengths_are_deterministic_and_bounded():
    lengths = example_lengths(500, 4096, seed=3)
    assert lengths == example_lengths(500, 4096, seed=3)
    assert lengths != example_lengths(500, 4096, seed=4)
    assert min(lengths) >= 32 and max(lengths) <= 4096


def test_lengths_have_a_realistic_spread():
    lengths = sorted(example_lengths(1000, 4096, seed=0))
    median = lengths[len(lengths) // 2]
    assert 4096 / 6 * 0.8 < median < 4096 / 6 * 1.2
    assert len(set(lengths)) > 100                         # not all the same length
    assert sum(n >= 0.9 * 4096 for n in lengths) >= 10     # some near the limit: padding to longest hurts
    assert sum(n < 4096 / 4 for n in lengths) > 500        # most far below it: packing matters


def test_short_limits_clip_at_the_limit():
    assert all(n == 16 for n in example_lengths(50, 16, seed=0))


def test_examples_are_shifted_continuations():
    examples = synthetic_examples(20, 256, vocab_size=100, seed=1)
    assert [e.line for e in examples] == list(range(1, 21))
    assert [len(e.input_ids) for e in examples] == example_lengths(20, 256, seed=1)
    for e in examples:
        assert not e.truncated
        assert all(0 <= t < 100 for t in e.input_ids)
        assert e.targets[:-1] == e.input_ids[1:] and e.targets[-1] == IGNORE
        assert e.trained_tokens == len(e.input_ids) - 1
    again = synthetic_examples(20, 256, vocab_size=100, seed=1)
    assert [e.input_ids for e in again] == [e.input_ids for e in examples]
