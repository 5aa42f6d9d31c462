"""Every speed switch gives the plain path's loss and gradients (CPU here; CUDA-only kernels in test_speed_gpu.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from usf_bios.engine import loss as loss_module
from usf_bios.engine import fused_lora, memory, offload
from usf_bios.engine import plan as plan_module
from usf_bios.engine.data import IGNORE, TokenizedExample, collate
from usf_bios.engine.loss import loss_sum
from usf_bios.engine.memory import layers_to_recompute
from usf_bios.engine.model import Placement, build_model
from usf_bios.engine.plan import SpeedPlan, SpeedPlanError, resolve_plan
from usf_bios.spec import Hyperparameters, JobSpec, Performance

CPU = Placement(torch.device("cpu"), "fp32")
PLAIN = SpeedPlan(attention="sdpa", loss="full", fused_kernels=False, fused_optimizer=False, checkpointing="none")


def tiny_base(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def spec(**hp) -> JobSpec:
    return JobSpec(name="speed", base_model="tiny", dataset="rows",
                   hyperparameters={"precision": "fp32", "lora_dropout": 0.0, **hp})


def lora_model(plan: SpeedPlan, dropout: float = 0.0):
    job = spec(lora_dropout=dropout, gradient_checkpointing=plan.checkpointing != "none")
    model, applied, notes = build_model(tiny_base(), job, plan, CPU)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at zero, which would make every A gradient zero: give B values
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.train()
    return model, applied, notes


def example(length: int, seed: int, trained_from: int) -> TokenizedExample:
    ids = torch.randint(0, 300, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    targets = [ids[t + 1] if t + 1 >= trained_from else IGNORE for t in range(length - 1)] + [IGNORE]
    return TokenizedExample(ids, targets, False, seed)


def packed_batch():
    rows = [[example(37, 1, 10), example(20, 2, 5), example(9, 3, 0)], [example(41, 4, 20)], [example(5, 5, 1)]]
    return collate(rows, pad_id=0)


def loss_and_grads(plan: SpeedPlan, dropout: float = 0.0, seed: int = 7):
    model, applied, _ = lora_model(plan, dropout)
    batch = packed_batch()
    torch.manual_seed(seed)
    value = loss_sum(model, batch, loss=applied.loss, attention=applied.attention)
    value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    return value.detach(), grads


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=name)


@pytest.fixture(scope="module")
def reference():
    return loss_and_grads(PLAIN)


def test_chunked_loss_matches_full_logits(reference, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 300 * 7)  # 7 positions per slice: many slices
    assert_same(loss_and_grads(dataclasses.replace(PLAIN, loss="chunked")), reference)


def test_chunked_loss_without_gradients_gives_the_same_sum(monkeypatch):
    model, _, _ = lora_model(PLAIN)
    batch = packed_batch()
    with torch.no_grad():
        full = loss_sum(model, batch, loss="full")
        monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 300 * 5)
        chunked = loss_sum(model, batch, loss="chunked")
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    assert full.item() > 0


def test_varlen_attention_matches_the_block_diagonal_mask(reference):
    assert_same(loss_and_grads(dataclasses.replace(PLAIN, attention="varlen")), reference)


def test_varlen_attention_would_differ_without_the_boundaries():
    """Guard: boundaries that merge two examples change the loss, so the test above can fail."""
    model, applied, _ = lora_model(dataclasses.replace(PLAIN, attention="varlen"))
    batch = packed_batch()
    merged = dataclasses.replace(batch, cu_seqlens=torch.tensor([0, 57, 66, 107, 123, 128, 132, 164], dtype=torch.int32))
    with torch.no_grad():
        right = loss_sum(model, batch, loss="full", attention="varlen")
        wrong = loss_sum(model, merged, loss="full", attention="varlen")
    assert not torch.allclose(right, wrong, rtol=1e-4)


@pytest.mark.parametrize("checkpointing", ["all", "offload"])
def test_checkpointing_matches_keeping_activations_with_dropout(checkpointing):
    """The recompute replays the forward pass's dropout masks (the RNG state is restored)."""
    plain = loss_and_grads(PLAIN, dropout=0.1)
    assert_same(loss_and_grads(dataclasses.replace(PLAIN, checkpointing=checkpointing), dropout=0.1), plain)


def test_offload_slices_the_mlp_over_long_rows_without_changing_gradients(reference, monkeypatch):
    calls = []
    original = offload._sliced_mlp
    monkeypatch.setattr(offload, "MLP_SLICE_TOKENS", 16)
    monkeypatch.setattr(offload, "_sliced_mlp", lambda forward, x: calls.append(x.shape) or original(forward, x))
    assert_same(loss_and_grads(dataclasses.replace(PLAIN, checkpointing="offload")), reference)
    assert calls  # the sliced path ran


def test_all_switches_together_match_the_plain_path(reference, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 300 * 11)
    fast = SpeedPlan(attention="varlen", loss="chunked", fused_kernels=False, fused_optimizer=False,
                     checkpointing="offload", fused_lora=True)
    # five switches reorder the same fp32 sums (one CI machine's BLAS gave a 1.2e-5 relative difference)
    assert_same(loss_and_grads(fast), reference, rtol=1e-4, atol=1e-5)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of each fused LoRA function, so a test can tell the fused path ran."""
    calls = {"linear": 0, "add": 0}
    for key, cls in (("linear", fused_lora._LoraLinear), ("add", fused_lora._LoraAdd)):
        original = cls.apply

        def counted(*args, _key=key, _original=original):
            calls[_key] += 1
            return _original(*args)
        monkeypatch.setattr(cls, "apply", counted)
    return calls


def test_fused_lora_matches_peft(reference, fused_calls):
    model, _, _ = lora_model(dataclasses.replace(PLAIN, fused_lora=True))
    assert sum("forward" in vars(m) for m in model.modules()) == 3 * 7  # every targeted linear layer of 3 layers
    assert_same(loss_and_grads(dataclasses.replace(PLAIN, fused_lora=True)), reference)
    assert fused_calls["linear"] == 3 * 7 and fused_calls["add"] == 0  # one forward pass


def test_fused_lora_under_bf16_autocast_matches_peft():
    """The bf16 path: peft's fp32 round trip of the input against the fused products, both under CPU autocast."""
    results = []
    for plan in (PLAIN, dataclasses.replace(PLAIN, fused_lora=True)):
        model, applied, _ = lora_model(plan)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss_sum(model, packed_batch(), loss="full")
        value.backward()
        results.append((value.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (plain_loss, plain_grads), (fused_loss, fused_grads) = results
    assert abs(fused_loss - plain_loss) / plain_loss < 5e-3
    for name, grad in plain_grads.items():
        assert fused_grads[name].dtype == torch.float32  # the adapter's own dtype, as peft gives it
        assert (fused_grads[name] - grad).norm() / grad.norm() < 2e-2, name


def test_fused_lora_keeps_a_quantized_base_layer_s_own_product(fused_calls):
    """A base layer that is not a plain nn.Linear (bitsandbytes) keeps its forward; only the adapter is fused on."""

    class Opaque(torch.nn.Linear):  # stands in for a quantized layer: a type the fused product does not take
        pass

    def opaque_base():
        base = tiny_base()
        for layer in base.model.layers:
            old = layer.mlp.down_proj
            layer.mlp.down_proj = Opaque(old.in_features, old.out_features, bias=False)
            layer.mlp.down_proj.weight = old.weight
        return base

    results = []
    for plan in (PLAIN, dataclasses.replace(PLAIN, fused_lora=True)):
        model, _, _ = build_model(opaque_base(), spec(gradient_checkpointing=False), plan, CPU)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(1)
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        value = loss_sum(model, packed_batch(), loss="full")
        value.backward()
        results.append((value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert fused_calls["add"] == 3 and fused_calls["linear"] == 3 * 6
    assert_same(results[1], results[0])


def test_fused_lora_leaves_dropout_to_peft(fused_calls):
    plain = loss_and_grads(PLAIN, dropout=0.1)
    assert_same(loss_and_grads(dataclasses.replace(PLAIN, fused_lora=True), dropout=0.1), plain)
    assert fused_calls == {"linear": 0, "add": 0}


def test_layers_to_recompute_takes_the_fewest_that_fit():
    gib = 2**30
    # 32 layers × 4096 tokens × 100 KiB = 12.5 GiB of activations: fits in 20 GiB free, recompute none
    assert layers_to_recompute(32, 4096, 100 * 1024, 8192, 20 * gib) == 0
    # with 10 GiB free (7 after headroom) some layers must go, but not all
    k = layers_to_recompute(32, 4096, 100 * 1024, 8192, 10 * gib)
    assert 0 < k < 32
    kept = (32 - k) * 4096 * 100 * 1024 + k * 4096 * 8192
    assert kept <= 10 * gib - memory.HEADROOM_BYTES < kept + 4096 * (100 * 1024 - 8192)
    assert layers_to_recompute(32, 4096, 100 * 1024, 8192, 1 * gib) == 32


def test_activation_estimate_grows_with_the_model():
    small, large = tiny_base().config, tiny_base().config
    large.intermediate_size *= 4
    assert memory.activation_bytes_per_token(large, 0.0) > memory.activation_bytes_per_token(small, 0.0)
    assert memory.activation_bytes_per_token(small, 0.1) > memory.activation_bytes_per_token(small, 0.0)


def test_auto_plan_on_the_cpu_is_the_portable_fast_path():
    plan = resolve_plan(Performance(), Hyperparameters(), CPU)
    assert plan == SpeedPlan(attention="sdpa", loss="chunked", fused_kernels=False, fused_optimizer=False,
                             checkpointing="all", fused_lora=True)
    assert resolve_plan(Performance(fused_lora="off"), Hyperparameters(), CPU).fused_lora is False
    assert resolve_plan(Performance(), Hyperparameters(gradient_checkpointing=False), CPU).checkpointing == "none"
    assert resolve_plan(Performance(attention="varlen"), Hyperparameters(), CPU).attention == "varlen"


@pytest.mark.parametrize("field,value,message", [
    ("loss", "fused", "performance.loss: fused needs a CUDA GPU"),
    ("fused_kernels", "on", "performance.fused_kernels: needs a CUDA GPU"),
    ("fused_optimizer", "on", "performance.fused_optimizer: the fused AdamW needs a CUDA GPU"),
])
def test_switches_the_cpu_cannot_honour_are_refused_by_name(field, value, message):
    with pytest.raises(SpeedPlanError, match=message):
        resolve_plan(Performance(**{field: value}), Hyperparameters(), CPU)


def test_a_trained_output_layer_falls_back_to_full_logits():
    job = spec(target_modules=["q_proj", "lm_head"])
    model, applied, notes = build_model(tiny_base(), job, dataclasses.replace(PLAIN, loss="chunked"), CPU)
    assert applied.loss == "full"
    assert any("loss: full logits, because the output layer is a" in n for n in notes)


def test_performance_switches_do_not_change_the_fingerprint():
    a = spec()
    b = JobSpec.model_validate({**a.model_dump(), "performance": {"attention": "sdpa", "loss": "full"}})
    assert a.fingerprint() == b.fingerprint()


def test_fused_lora_recasts_the_adapter_after_an_in_place_update():
    """The bf16 copies of A and B are cached per layer; an optimizer's in-place write must invalidate them."""
    model, _, _ = lora_model(dataclasses.replace(PLAIN, fused_lora=True))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, layer.in_features)

    def fused_and_plain():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x), type(layer).forward(layer, x)

    before, _ = fused_and_plain()
    with torch.no_grad():
        layer.lora_B["default"].weight.add_(0.5)
    after, plain = fused_and_plain()
    assert (after - before).abs().max() > 0.1
    torch.testing.assert_close(after, plain, rtol=2e-2, atol=2e-2)


def step_examples() -> list[TokenizedExample]:
    return [example(length, seed, seed % 7) for seed, length in enumerate([37, 20, 9, 41, 5, 30, 12, 26, 18, 33, 7, 22])]


def test_merged_batches_keep_the_rows_in_order_within_the_budget():
    from usf_bios.engine.data import TrainingData

    data = TrainingData(step_examples(), batch_size=2, max_seq_length=48, packing=True, val_split=0.0, seed=0, pad_id=0)
    order = data.epoch_order(0)
    plain = [data.micro_batch(order, i) for i in range(3)]
    merged = data.merged_batches(order, 0, 3, tokens_per_pass=200)
    assert len(merged) < len(plain)
    assert all(b.input_ids.shape[0] == 1 and b.real_tokens <= 200 for b in merged)
    assert sum(b.rows for b in merged) == sum(b.rows for b in plain) == 6
    assert sum(b.trained_tokens for b in merged) == sum(b.trained_tokens for b in plain)
    flat = [t for b in merged for t in b.input_ids.flatten().tolist()]
    examples_in_plain = [ex.input_ids for i in order[:6] for ex in data.train_rows[i]]
    position = 0
    for ids in examples_in_plain:  # every example appears whole, in the same order, one after the other
        assert flat[position:position + len(ids)] == ids
        position += len(ids)
    assert position == len(flat)
    assert data.merged_batches(order, 0, 3, tokens_per_pass=1)[0].rows == 1  # a row longer than the budget goes alone


def train_steps(plan: SpeedPlan, steps: int = 2):
    from usf_bios.engine.checkpoint import TrainerState
    from usf_bios.engine.data import TrainingData
    from usf_bios.engine.events import EventLog
    from usf_bios.engine.loop import TrainingRun, train
    import tempfile
    from pathlib import Path

    job = spec(batch_size=1, gradient_accumulation_steps=3, max_seq_length=48, learning_rate=1e-2,
               gradient_checkpointing=False)
    model, applied, _ = lora_model(dataclasses.replace(plan, merge_micro_batches=False))  # no GPU to size it by
    applied = dataclasses.replace(applied, merge_micro_batches=plan.merge_micro_batches,
                                  tokens_per_pass=plan.tokens_per_pass)
    data = TrainingData(step_examples(), batch_size=1, max_seq_length=48, packing=True, val_split=0.0, seed=0, pad_id=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _s: 1.0)
    with tempfile.TemporaryDirectory() as folder:
        events = EventLog(Path(folder) / "events.jsonl", Path(folder) / "train.log")
        state = TrainerState(total_steps=steps)
        run = TrainingRun(model, optimizer, scheduler, data, CPU, job.hyperparameters, state, events,
                          Path(folder) / "checkpoints", should_stop=lambda: False, plan=applied)
        train(run)
        events.close()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, state


def test_merging_micro_batches_takes_the_same_optimizer_steps():
    plain_plan = dataclasses.replace(PLAIN, attention="varlen")
    plain, plain_state = train_steps(plain_plan)
    merged, merged_state = train_steps(dataclasses.replace(plain_plan, merge_micro_batches=True, tokens_per_pass=200))
    assert merged_state.samples_seen == plain_state.samples_seen == 6
    assert merged_state.micro_batch == plain_state.micro_batch
    assert_same((torch.zeros(()), merged), (torch.zeros(()), plain), rtol=1e-4, atol=1e-6)
    moved = max((plain[n] - p).abs().max().item() for n, p in lora_model(plain_plan)[0].named_parameters()
                if p.requires_grad)
    assert moved > 1e-3  # the steps changed the adapter, so equal results mean equal steps


def test_tokens_per_pass_fills_free_memory_up_to_a_step():
    gib = 2**30
    per_token = 100 * 1024
    assert memory.tokens_per_pass(32, per_token, 3 * gib, 4096, 16384) == 0  # nothing beyond one micro-batch fits
    fit = memory.tokens_per_pass(32, per_token, 40 * gib, 4096, 16384)
    assert 4096 < fit < 16384 and 32 * fit * per_token <= 40 * gib - memory.HEADROOM_BYTES
    assert memory.tokens_per_pass(32, per_token, 400 * gib, 4096, 16384) == 16384


def test_merging_needs_varlen_attention_on_a_gpu():
    assert resolve_plan(Performance(), Hyperparameters(), CPU).merge_micro_batches is False
    with pytest.raises(SpeedPlanError, match="merge_micro_batches"):
        resolve_plan(Performance(merge_micro_batches="on"), Hyperparameters(), CPU)


def test_merging_a_plan_that_recomputes_every_layer_only_when_asked():
    qlora = Hyperparameters(quantization="4bit")
    auto = plan_module.plan_for(Performance(), qlora, cuda=True, liger=True)
    assert auto.checkpointing == "auto" and auto.merge_micro_batches is True   # as bf16 LoRA: what fits is kept
    for checkpointing in ("all", "offload"):
        every = plan_module.plan_for(Performance(checkpointing=checkpointing), qlora, cuda=True, liger=True)
        assert every.checkpointing == checkpointing and every.merge_micro_batches is False
        on = plan_module.plan_for(Performance(merge_micro_batches="on", checkpointing=checkpointing), qlora,
                                  cuda=True, liger=True)
        assert on.checkpointing == checkpointing and on.merge_micro_batches is True
    assert plan_module.plan_for(Performance(), qlora, cuda=False, liger=False).checkpointing == "all"


def test_compiled_layers_match_the_plain_path(reference):
    """torch.compile (inductor, C++ on the CPU) of each decoder layer, with the other CPU switches on."""
    plan = dataclasses.replace(PLAIN, attention="varlen", fused_lora=True, compile=True)
    model, _, notes = lora_model(plan)
    assert all(layer._compiled_call_impl is not None for layer in offload.decoder_layers(model))
    assert "compiled layers" in notes[-1]
    assert_same(loss_and_grads(plan), reference, rtol=1e-4, atol=1e-5)


def test_compile_leaves_out_the_liger_kernels_that_break_compiled_layers():
    why = "needs liger"
    assert plan_module._fused_kernels(Performance(), True, why) is True
    assert plan_module._fused_kernels(Performance(compile="on"), True, why) is False
    assert plan_module._fused_kernels(Performance(compile="on", fused_kernels="off"), True, why) is False
    with pytest.raises(SpeedPlanError, match="fused_kernels: Liger's kernels do not work inside compiled layers"):
        plan_module._fused_kernels(Performance(compile="on", fused_kernels="on"), True, why)
    with pytest.raises(SpeedPlanError, match="fused_kernels: needs liger"):
        plan_module._fused_kernels(Performance(fused_kernels="on"), False, why)


def test_compile_is_off_unless_asked():
    assert resolve_plan(Performance(), Hyperparameters(), CPU).compile is False
    assert resolve_plan(Performance(compile="auto"), Hyperparameters(), CPU).compile is False
    assert resolve_plan(Performance(compile="on"), Hyperparameters(), CPU).compile is True


def test_an_offload_plan_larger_than_host_memory_is_refused_by_name():
    gib = 2**30
    memory.check_host_memory(80 * gib, 125 * gib)
    memory.check_host_memory(80 * gib, None)          # cannot tell: goes ahead
    with pytest.raises(SpeedPlanError, match=r"checkpointing: offload would keep up to 107.4 GB .* 64.4 GB available"):
        memory.check_host_memory(100 * gib, 60 * gib)
    assert memory.available_host_bytes() is None or memory.available_host_bytes() > 0


def test_host_copies_come_back_whole_from_power_of_two_pieces(monkeypatch):
    monkeypatch.setattr(offload, "OFFLOAD_PIECE_BYTES", 64)
    tensor = torch.randn(3, 37)
    copy = offload.HostCopy(tensor)
    assert [p.numel() for p in copy.pieces] == [16] * 6 + [15]   # 111 fp32 values, 16 (64 bytes) a piece
    assert all(p.data_ptr() != tensor.data_ptr() for p in copy.pieces)
    tensor_before = tensor.clone()
    tensor.zero_()   # the copy does not share memory with the original
    assert torch.equal(copy.to(torch.device("cpu")), tensor_before)


def test_offload_keeps_on_the_gpu_what_fits_and_gradients_do_not_change(reference, monkeypatch):
    """Offloading only some layers' inputs (as on a GPU with room for the rest) gives the same gradients; the
    offloaded input travels in several pieces."""
    monkeypatch.setattr(offload, "OFFLOAD_PIECE_BYTES", 1024)
    counts = []
    monkeypatch.setattr(offload, "_offload_count", lambda model, layers, *rest: counts.append(layers) or 1)
    model, _, notes = lora_model(dataclasses.replace(PLAIN, checkpointing="offload"))
    hosts = [layer._gradient_checkpointing_func.keywords["to_host"] for layer in offload.decoder_layers(model)]
    assert hosts == [True, False, False] and "1 keep their input in host memory" in notes[-1]
    assert_same(loss_and_grads(dataclasses.replace(PLAIN, checkpointing="offload")), reference)
    assert counts == [3, 3]


def count_host_copies(monkeypatch) -> list:
    """Every ``HostCopies`` the engine makes from now on, in a list (to read their fetch counters)."""
    trackers = []

    class Counted(offload.HostCopies):
        def __init__(self):
            super().__init__()
            trackers.append(self)

    monkeypatch.setattr(offload, "HostCopies", Counted)
    return trackers


@pytest.mark.parametrize("offloaded, ahead, late", [(1, 1, 0), (3, 2, 1)])
def test_offloaded_inputs_come_back_ahead_of_their_backward_pass(reference, monkeypatch, offloaded, ahead, late):
    """Each layer's backward pass starts fetching the input of the layer whose backward pass comes next; only the
    last layer's, needed first, comes back late. Gradients do not change."""
    trackers = count_host_copies(monkeypatch)
    monkeypatch.setattr(offload, "_offload_count", lambda model, layers, *rest: offloaded)
    assert_same(loss_and_grads(dataclasses.replace(PLAIN, checkpointing="offload")), reference)
    assert len(trackers) == 1 and (trackers[0].fetched_ahead, trackers[0].fetched_late) == (ahead, late)
    assert trackers[0]._waiting == [] or all(ref() is None for ref in trackers[0]._waiting)


def test_an_abandoned_pass_leaves_no_input_waiting_in_host_memory(monkeypatch):
    monkeypatch.setattr(offload, "_offload_count", lambda model, layers, *rest: layers)
    model, applied, _ = lora_model(dataclasses.replace(PLAIN, checkpointing="offload"))
    tracker = offload.decoder_layers(model)[0]._gradient_checkpointing_func.keywords["copies"]
    value = loss_sum(model, packed_batch(), loss=applied.loss, attention=applied.attention)
    assert len(tracker._waiting) == 3 and all(ref() is not None for ref in tracker._waiting)
    del value   # no backward pass: the graph, and with it the host copies, are gone
    assert all(ref() is None for ref in tracker._waiting)
    tracker.fetch_next(torch.device("cpu"))
    assert tracker._waiting == [] and tracker.fetched_ahead == 0


def test_layers_to_offload_fills_the_gpu_first():
    gib = 2**30
    args = dict(num_layers=32, working_bytes=350_000 * 150_000, layer_input_bytes=350_000 * 8192)
    room = 100 * gib - memory.HEADROOM_BYTES - 350_000 * 150_000
    partly = memory.layers_to_offload(free_bytes=100 * gib, **args)
    assert 0 < partly < 32 and partly == 32 - (room // (350_000 * 8192) - 1)  # one room for the input fetched ahead
    assert memory.layers_to_offload(free_bytes=500 * gib, **args) == 0
    assert memory.layers_to_offload(free_bytes=10 * gib, **args) == 32  # not even the working set fits


@pytest.mark.parametrize("variable", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_expandable_segments_are_asked_for_only_where_the_user_left_the_allocator_alone(variable):
    environ: dict[str, str] = {}
    assert memory.prefer_expandable_segments(environ) is True
    assert environ == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert memory.prefer_expandable_segments(environ) is False
    users = {variable: "max_split_size_mb:512"}
    assert memory.prefer_expandable_segments(users) is False
    assert users == {variable: "max_split_size_mb:512"}


@pytest.mark.parametrize("liger, checkpointing, expected", [
    (True, "auto", "fused"), (True, "all", "fused"), (True, "offload", "chunked"), (False, "auto", "chunked")])
def test_auto_loss_is_ligers_on_a_gpu_that_has_it_except_for_long_context_offload(monkeypatch, liger, checkpointing,
                                                                                  expected):
    real = plan_module._has
    monkeypatch.setattr(plan_module, "_has", lambda name: liger if name == "liger_kernel" else real(name))
    gpu = Placement(torch.device("cuda", 0), "bf16")
    assert resolve_plan(Performance(checkpointing=checkpointing), Hyperparameters(), gpu).loss == expected
    assert resolve_plan(Performance(checkpointing=checkpointing), Hyperparameters(), CPU).loss == "chunked"


def quantized_tiny_base():
    """The tiny model with every decoder linear layer in bitsandbytes NF4 (double quantization), on the CPU."""
    bnb = pytest.importorskip("bitsandbytes")
    base = tiny_base()
    for layer in base.model.layers:
        for name, linear in [(n, m) for n, m in layer.named_modules() if type(m) is torch.nn.Linear]:
            quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                          compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
            quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True).to("cpu")
            quantized.requires_grad_(False)
            layer.set_submodule(name, quantized)
    return base


def quantized_loss_and_grads(plan: SpeedPlan, calls: dict[str, int] | None = None):
    job = JobSpec(name="speed", base_model="tiny", dataset="rows",
                  hyperparameters={"precision": "fp32", "lora_dropout": 0.0, "quantization": "4bit",
                                   "gradient_checkpointing": plan.checkpointing != "none"})
    model, applied, _ = build_model(quantized_tiny_base(), job, plan, CPU)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.train()
    value = loss_sum(model, packed_batch(), loss=applied.loss, attention=applied.attention)
    value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    return value.detach(), grads


def test_qlora_auto_recomputes_only_the_layers_that_do_not_fit(monkeypatch):
    """QLoRA's default on a GPU: as bf16 LoRA, only the layers that do not fit recompute (here the first of three,
    as the memory model would pick with little free memory); the 4-bit layers of that one keep their dequantized
    weight from the recomputed forward, the others dequantize again in the backward. Same loss and gradients as
    peft on bitsandbytes, recomputing nothing."""
    monkeypatch.setattr(offload, "free_gpu_bytes", lambda model: 0)
    monkeypatch.setattr(offload, "layers_to_recompute", lambda layers, *rest: 1)
    plain = quantized_loss_and_grads(PLAIN)
    kept = []
    original = fused_lora._LoraLinear4bit.apply
    monkeypatch.setattr(fused_lora._LoraLinear4bit, "apply", lambda *args: kept.append(args[-1]) or original(*args))
    fused = quantized_loss_and_grads(dataclasses.replace(PLAIN, checkpointing="auto", fused_lora=True))
    assert_same(fused, plain, rtol=1e-4, atol=1e-5)
    # layer 0: checkpointed forward + recomputed forward (both marked), layers 1-2: one forward each
    assert kept == [True] * 7 + [False] * 14 + [True] * 7


@pytest.mark.parametrize("checkpointing", ["none", "all", "offload"])
def test_fused_4bit_lora_matches_peft_and_bitsandbytes(checkpointing, monkeypatch):
    """LoRA fused with its NF4 projection (one function, W dequantized once per forward, and in recomputed layers
    kept for the backward) against peft's LoRA on bitsandbytes' own 4-bit product: same loss and gradients."""
    plain = quantized_loss_and_grads(dataclasses.replace(PLAIN, checkpointing=checkpointing))
    calls = {"apply": 0, "kept": 0, "dequantize": 0}
    original_apply, original_dequantize = fused_lora._LoraLinear4bit.apply, fused_lora._dequantize_4bit

    def counted_apply(*args):
        calls["apply"] += 1
        calls["kept"] += bool(args[-1])
        return original_apply(*args)

    def counted_dequantize(*args):
        calls["dequantize"] += 1
        return original_dequantize(*args)

    monkeypatch.setattr(fused_lora._LoraLinear4bit, "apply", counted_apply)
    monkeypatch.setattr(fused_lora, "_dequantize_4bit", counted_dequantize)
    fused = quantized_loss_and_grads(dataclasses.replace(PLAIN, checkpointing=checkpointing, fused_lora=True))
    assert_same(fused, plain, rtol=1e-4, atol=1e-5)
    linears = 3 * 7
    if checkpointing == "none":  # one forward; the backward dequantizes again (nothing kept), except for the first
        # layer's q/k/v projections, whose input (the embeddings' output) needs no gradient
        assert calls == {"apply": linears, "kept": 0, "dequantize": 2 * linears - 3}
    else:  # forward, recomputed forward (kept for the backward): two dequantizations, not three
        assert calls == {"apply": 2 * linears, "kept": 2 * linears, "dequantize": 2 * linears}
