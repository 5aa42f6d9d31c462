"""The CUDA-only speed switches against the plain path, in bf16 (skipped without a GPU; run on the lent H100).

bf16 rounding differs between kernels, so losses and gradients are compared by relative error, not bit for bit;
a wrong kernel (examples attending across their boundary, a dropped term) is off by far more than the bound.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from tests.engine.test_speed import PLAIN, count_host_copies, packed_batch, spec
from usf_bios.engine.loss import loss_sum
from usf_bios.engine.model import Placement
from usf_bios.engine.loop import make_optimizer
from usf_bios.engine.model import build_model
from usf_bios.engine.plan import SpeedPlan, resolve_plan
from usf_bios.spec import Hyperparameters, Performance

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = Placement(torch.device("cuda", 0), "bf16")
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None


def gpu_base():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(GPU.device, torch.bfloat16)


def gpu_model(plan: SpeedPlan, quantized: bool = False):
    base = gpu_base()
    if quantized:
        from usf_bios.bench.models import quantize_decoder_layers

        quantize_decoder_layers(base, torch.bfloat16)
    model, applied, _ = build_model(base, spec(precision="bf16", gradient_checkpointing=plan.checkpointing != "none",
                                               quantization="4bit" if quantized else "none"), plan, GPU)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator).to(param) * 0.05)
    model.train()
    return model, applied


def loss_and_grads(plan: SpeedPlan, quantized: bool = False):
    model, applied = gpu_model(plan, quantized)
    batch = packed_batch().to(GPU.device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        value = loss_sum(model, batch, loss=applied.loss, attention=applied.attention)
    value.backward()
    return value.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def assert_close_bf16(a, b, bound=2e-2):
    assert abs(a[0] - b[0]) / b[0] < 5e-3, (a[0], b[0])
    for name in b[1]:
        error = (a[1][name] - b[1][name]).norm() / b[1][name].norm()
        assert error < bound, f"{name}: relative error {error:.4f}"


@pytest.fixture(autouse=True)
def restore_llama_module():
    """Liger swaps RoPE, RMSNorm and the MLP in transformers' Llama module for the whole process (the engine runs one
    job per process); put them back so later tests, on the CPU too, get the model's own layers."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    yield
    for name, value in saved.items():
        setattr(modeling_llama, name, value)


@pytest.fixture(scope="module")
def reference():
    return loss_and_grads(PLAIN)


def test_auto_plan_on_cuda_takes_the_fast_paths():
    plan = resolve_plan(Performance(), Hyperparameters(), GPU)
    assert (plan.attention, plan.fused_optimizer, plan.checkpointing) == ("varlen", True, "auto")
    assert plan.loss == ("fused" if HAS_LIGER else "chunked")
    assert plan.fused_kernels == HAS_LIGER and plan.merge_micro_batches is True
    assert resolve_plan(Performance(checkpointing="offload"), Hyperparameters(), GPU).loss == "chunked"
    assert resolve_plan(Performance(), Hyperparameters(quantization="4bit"), GPU).checkpointing == "auto"


def test_flash_varlen_attention_matches_the_masked_sdpa(reference):
    from usf_bios.engine import attention

    assert_close_bf16(loss_and_grads(dataclasses.replace(PLAIN, attention="varlen")), reference)
    # the model has 4 query heads and 2 K/V heads: the kernel took them as they are, not repeated
    assert attention._varlen_call().takes_gqa_flag or attention._native_gqa.get("ok") is True


def test_chunked_loss_matches_full_logits_on_cuda(reference):
    assert_close_bf16(loss_and_grads(dataclasses.replace(PLAIN, loss="chunked")), reference)


def test_offloaded_checkpointing_matches_on_cuda(reference):
    """A tiny model fits: every layer's input stays on the GPU."""
    assert_close_bf16(loss_and_grads(dataclasses.replace(PLAIN, checkpointing="offload")), reference)


def test_inputs_offloaded_to_pinned_host_memory_match_on_cuda(reference, monkeypatch):
    from usf_bios.engine import offload

    trackers = count_host_copies(monkeypatch)
    monkeypatch.setattr(offload, "_offload_count", lambda model, layers, *rest: layers)
    assert_close_bf16(loss_and_grads(dataclasses.replace(PLAIN, checkpointing="offload")), reference)
    # copied on a side stream; the first layer's input came back ahead of its backward pass, the last one's late
    assert trackers and trackers[0]._stream is not None
    assert (trackers[0].fetched_ahead, trackers[0].fetched_late) == (1, 1)


def test_the_embedding_table_in_host_memory_matches_and_leaves_the_gpu(reference):
    from usf_bios.engine.host_embeddings import HostEmbeddingLookup

    plan = dataclasses.replace(PLAIN, host_embeddings=True)
    model, applied = gpu_model(plan)
    table = model.get_input_embeddings()
    assert applied.host_embeddings and isinstance(table.forward, HostEmbeddingLookup)
    assert table.weight.device.type == "cpu" and model.get_output_embeddings().weight.is_cuda
    assert_close_bf16(loss_and_grads(plan), reference)


@pytest.mark.skipif(not HAS_LIGER, reason="needs liger-kernel")
def test_liger_fused_loss_matches_full_logits(reference):
    assert_close_bf16(loss_and_grads(dataclasses.replace(PLAIN, loss="fused")), reference)


@pytest.mark.skipif(not HAS_LIGER, reason="needs liger-kernel")
def test_liger_kernels_match_the_model_s_own_layers(reference):
    assert_close_bf16(loss_and_grads(dataclasses.replace(PLAIN, fused_kernels=True)), reference)


def test_everything_on_matches_the_plain_path(reference):
    fast = SpeedPlan(attention="varlen", loss="chunked", fused_kernels=HAS_LIGER, fused_optimizer=True,
                     checkpointing="auto", fused_lora=True)
    assert_close_bf16(loss_and_grads(fast), reference)


def test_fused_lora_matches_peft_on_cuda(reference):
    assert_close_bf16(loss_and_grads(dataclasses.replace(PLAIN, fused_lora=True)), reference)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_fused_lora_on_nf4_layers_matches_peft():
    from peft.tuners.lora.bnb import Linear4bit

    model, _ = gpu_model(dataclasses.replace(PLAIN, fused_lora=True), quantized=True)
    fused = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert fused and all("forward" in vars(m) for m in fused)
    assert_close_bf16(loss_and_grads(dataclasses.replace(PLAIN, fused_lora=True), quantized=True),
                      loss_and_grads(PLAIN, quantized=True))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
@pytest.mark.parametrize("checkpointing", ["all", "offload"])
def test_fused_nf4_lora_in_recomputed_layers_matches_peft(checkpointing, monkeypatch):
    """The 4-bit LoRA function in recomputed layers (the dequantized weight kept from the recomputed forward for the
    backward) against peft on bitsandbytes' own 4-bit product, both recomputing."""
    from usf_bios.engine import fused_lora

    kept = []
    original = fused_lora._LoraLinear4bit.apply
    monkeypatch.setattr(fused_lora._LoraLinear4bit, "apply", lambda *args: kept.append(args[-1]) or original(*args))
    plan = dataclasses.replace(PLAIN, checkpointing=checkpointing)
    fused = loss_and_grads(dataclasses.replace(plan, fused_lora=True), quantized=True)
    assert kept and all(kept)
    assert_close_bf16(fused, loss_and_grads(plan, quantized=True))


def test_fused_adamw_takes_the_same_steps():
    params = {}
    for fused in (False, True):
        plan = dataclasses.replace(PLAIN, fused_optimizer=fused)
        model, applied = gpu_model(plan)
        trainable = [p for p in model.parameters() if p.requires_grad]
        start = torch.cat([p.detach().flatten() for p in trainable]).clone()
        optimizer = make_optimizer(trainable, Hyperparameters(learning_rate=1e-3), applied)
        assert optimizer.defaults.get("fused") is (True if fused else None)
        batch = packed_batch().to(GPU.device)
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss_sum(model, batch, loss="full").backward()
            optimizer.step()
            optimizer.zero_grad()
        params[fused] = torch.cat([p.detach().flatten() for p in trainable])
    # Adam normalises each update, so where a gradient is almost zero the two kernels' rounding moves a weight by a
    # different fraction of the learning rate: compare against the size of the steps taken, not absolutely.
    moved = (params[False] - start).norm()
    assert moved > 1e-3
    assert (params[True] - params[False]).norm() < 0.01 * moved, ((params[True] - params[False]).norm(), moved)


ALLOCATOR_PROBE = """
import torch  # imported first, as the engine's modules do, before the setting is made
from usf_bios.engine.memory import expandable_segments_active, prefer_expandable_segments
made = prefer_expandable_segments()
keep = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
print(made, expandable_segments_active(torch.device("cuda", 0)))
"""


@pytest.mark.parametrize("user_setting, expected", [(None, "True True"), ("expandable_segments:False", "False False")])
def test_training_processes_get_expandable_segments_unless_the_user_set_the_allocator(user_setting, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    if user_setting:
        env["PYTORCH_CUDA_ALLOC_CONF"] = user_setting
    out = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[-2] == expected
