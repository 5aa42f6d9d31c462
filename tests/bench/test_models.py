import torch

from usf_bios.bench.configs import parameter_count
from usf_bios.bench.models import build_model


def test_random_model_of_the_named_shape_frozen_and_ready_for_sdpa():
    torch.manual_seed(0)
    model = build_model("tiny-llama", "none", torch.device("cpu"), torch.float32)
    assert sum(p.numel() for p in model.parameters()) == parameter_count("tiny-llama")
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config.use_cache is False and model.config._attn_implementation == "sdpa"
    weight = model.model.layers[0].mlp.up_proj.weight
    assert weight.dtype == torch.float32 and 0.01 < weight.std().item() < 0.03  # initialised, not empty memory
    assert not getattr(model, "is_loaded_in_4bit", False)


def test_dtype_is_applied():
    model = build_model("tiny-llama", "none", torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
