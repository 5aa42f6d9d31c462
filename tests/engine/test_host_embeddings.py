"""The input embedding table in host memory (performance.host_embeddings): the same loss and gradients as the
table on the device, the table's memory freed, and the cases where it must stay (tied, trained)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.engine.test_speed import CPU, PLAIN, assert_same, loss_and_grads, lora_model, spec, tiny_base
from usf_bios.engine.host_embeddings import HostEmbeddingLookup, keep_embeddings_on_host, model_device
from usf_bios.engine.memory import peak_memory
from usf_bios.engine.model import build_model
from usf_bios.engine.plan import SpeedPlanError, plan_for, resolve_plan
from usf_bios.spec import Hyperparameters, JobSpec, Performance

HOST = dataclasses.replace(PLAIN, host_embeddings=True)


def test_the_table_looked_up_in_host_memory_gives_the_same_loss_and_gradients():
    model, applied, notes = lora_model(HOST)
    lookup = model.get_input_embeddings().forward
    assert isinstance(lookup, HostEmbeddingLookup) and lookup.plain
    assert applied.host_embeddings and any(n.startswith("host embeddings: the input embedding table") for n in notes)
    assert_same(loss_and_grads(HOST), loss_and_grads(PLAIN))


def test_an_embedding_class_of_its_own_runs_its_own_forward_on_the_host():
    class Scaled(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 3.0

    model = tiny_base()
    scaled = Scaled(300, 64)
    scaled.weight.data.copy_(model.get_input_embeddings().weight.data)
    scaled.weight.requires_grad_(False)
    model.set_input_embeddings(scaled)
    ids = torch.tensor([[1, 5, 299]])
    expected = scaled(ids)
    assert keep_embeddings_on_host(model, torch.device("cpu"))[0]
    assert not scaled.forward.plain
    torch.testing.assert_close(scaled(ids), expected)


def test_a_tied_or_trained_table_stays_where_it_is():
    tied = tiny_base()
    tied.lm_head.weight = tied.model.embed_tokens.weight
    moved, note = keep_embeddings_on_host(tied, torch.device("cpu"))
    assert not moved and note.startswith("host embeddings off: the input embeddings are tied")
    assert not isinstance(tied.get_input_embeddings().forward, HostEmbeddingLookup)

    job = spec(target_modules=["q_proj", "embed_tokens"], gradient_checkpointing=False)
    model, applied, notes = build_model(tiny_base(), job, HOST, CPU)
    assert applied.host_embeddings is False
    assert "host embeddings off: the input embeddings are trained (a LoRA target)" in notes


def test_model_device_skips_the_table_in_host_memory():
    model = tiny_base()
    assert model_device(model) == torch.device("cpu")
    model.lm_head.to("meta")
    model.model.layers.to("meta")
    assert model_device(model) == torch.device("meta")   # the first parameter not in host memory


def test_auto_keeps_the_table_in_host_memory_for_the_small_footprint_plans_only():
    hp = Hyperparameters()
    assert plan_for(Performance(checkpointing="all"), hp, cuda=True, liger=True).host_embeddings
    assert plan_for(Performance(checkpointing="offload"), hp, cuda=True, liger=True).host_embeddings
    assert not plan_for(Performance(), hp, cuda=True, liger=True).host_embeddings
    assert plan_for(Performance(host_embeddings="on"), hp, cuda=True, liger=True).host_embeddings
    assert not plan_for(Performance(checkpointing="all", host_embeddings="off"), hp, cuda=True,
                        liger=True).host_embeddings
    assert not resolve_plan(Performance(checkpointing="all"), hp, CPU).host_embeddings
    with pytest.raises(SpeedPlanError, match="performance.host_embeddings: needs a CUDA GPU"):
        resolve_plan(Performance(host_embeddings="on"), hp, CPU)


def test_the_estimate_leaves_the_table_out_of_gpu_memory():
    config = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}

    def weights(gpus: int = 1, **performance):
        job = JobSpec(name="e", base_model="m", dataset="d", performance={"checkpointing": "all", **performance},
                      hyperparameters={"quantization": "4bit"}, gpu_config={"num_gpus": gpus, "strategy": "ddp"})
        return peak_memory(job, config, 8_030_000_000, 42_000_000, 80 * 2**30)[0]["weights"]

    table_gib = 128256 * 4096 * 2 / 2**30
    assert weights(host_embeddings="off") - weights() == pytest.approx(table_gib, abs=1e-3)
    assert weights(gpus=2) == weights(host_embeddings="off")   # DDP keeps the table on each GPU (engine/run.py)
    assert weights(host_embeddings="off") - weights(host_embeddings="on") == pytest.approx(table_gib, abs=1e-3)
    tied = {**config, "tie_word_embeddings": True}
    job = JobSpec(name="e", base_model="m", dataset="d", performance={"checkpointing": "all"})
    assert peak_memory(job, tied, 8_030_000_000, 42_000_000, 80 * 2**30)[0]["weights"] == pytest.approx(
        8_030_000_000 * 2 / 2**30, abs=1e-3)
