import pytest

from usf_bios.bench.configs import CONFIGS, MODEL_SHAPES, BenchConfig, build_config, get_config, parameter_count


@pytest.mark.parametrize("model, expected", [
    ("llama3.1-8b", 8_030_261_248),
    ("qwen2.5-7b", 7_615_616_512),
    ("smollm2-135m", 134_515_008),
])
def test_parameter_counts_match_the_published_models(model, expected):
    assert parameter_count(model) == expected


def test_llama31_config_carries_the_llama3_rope_scaling():
    config = build_config("llama3.1-8b")
    assert type(config).__name__ == "LlamaConfig"
    assert config.rope_parameters == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}
    assert (config.num_key_value_heads, config.max_position_embeddings, config.tie_word_embeddings) == (8, 131072, False)


def test_qwen_and_smollm_configs():
    qwen, smol = build_config("qwen2.5-7b"), build_config("smollm2-135m")
    assert type(qwen).__name__ == "Qwen2Config"
    assert qwen.rope_parameters["rope_theta"] == 1e6 and qwen.rms_norm_eps == 1e-6
    assert smol.tie_word_embeddings and smol.rope_parameters["rope_theta"] == 100000.0


def test_build_config_does_not_share_state_between_calls():
    build_config("llama3.1-8b").rope_parameters["factor"] = 1.0
    assert build_config("llama3.1-8b").rope_parameters["factor"] == 8.0
    assert MODEL_SHAPES["llama3.1-8b"]["rope_parameters"]["factor"] == 8.0


def test_required_configs_exist_and_are_consistent():
    for name in ("llama3.1-8b-lora-bf16-4096", "qwen2.5-7b-lora-bf16-4096", "llama3.1-8b-qlora-nf4-4096",
                 "smollm2-135m-lora-bf16-2048", "tiny-llama-lora-fp32-256"):
        cfg = get_config(name)
        assert cfg.name == name and cfg.model in MODEL_SHAPES
        assert cfg.examples_per_step % cfg.baseline_micro_batch == 0
    assert get_config("llama3.1-8b-qlora-nf4-4096").quantization == "4bit"
    big = get_config("llama3.1-8b-lora-bf16-4096")
    assert (big.examples_per_step, big.baseline_micro_batch, big.warmup_steps, big.timed_steps) == (16, 4, 2, 6)
    assert (big.lora_r, big.lora_alpha, big.learning_rate, big.seed) == (16, 32, 1e-4, 0)
    assert big.steps == 8 and big.num_examples == 128
    assert all(c.seq_len <= build_config(c.model).max_position_embeddings for c in CONFIGS.values())


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known: .*llama3.1-8b-lora-bf16-4096"):
        get_config("llama-9000")
    with pytest.raises(ValueError, match="known: .*smollm2-135m"):
        build_config("gpt-5")


def test_bench_config_validation():
    with pytest.raises(ValueError, match="multiple of"):
        BenchConfig("x", "tiny-llama", "none", 64, examples_per_step=6, baseline_micro_batch=4)
    with pytest.raises(ValueError, match="quantization"):
        BenchConfig("x", "tiny-llama", "8bit", 64)
    with pytest.raises(ValueError, match="unknown model"):
        BenchConfig("x", "nope", "none", 64)
