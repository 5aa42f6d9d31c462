import pytest

from usf_bios.bench.measure import PEAK_BF16_FLOPS, Measurement, mfu, summarize


def test_mfu_formula():
    assert PEAK_BF16_FLOPS == 989e12
    assert mfu(12_473, 8.03e9) == pytest.approx(0.405, abs=5e-4)
    assert mfu(1000, 1e9, peak=4e12) == pytest.approx(1.0)


def test_summarize_leaves_out_the_warm_up():
    assert summarize([10.0, 1.0, 2.0], [5, 100, 300], warmup=1) == pytest.approx(400 / 3)
    assert summarize([1.0, 1.0], [50, 70], warmup=0) == pytest.approx(60)


def test_summarize_without_timed_steps_is_an_error():
    with pytest.raises(ValueError, match="no timed step"):
        summarize([1.0, 2.0], [10, 10], warmup=2)
    with pytest.raises(ValueError, match="token counts"):
        summarize([1.0, 2.0], [10], warmup=0)


def test_measurement_json_round_trip():
    import json

    m = Measurement(1234.5, 17.25, step_seconds=[1.5, 0.5], step_tokens=[100, 200], losses=[2.0, 1.5])
    assert Measurement.from_dict(json.loads(json.dumps(m.to_dict()))) == m
