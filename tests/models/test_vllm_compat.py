"""The adapter folders this project writes pass the rules vLLM's LoRA loader applies (issue 16, item 6), and the
check names what a folder that breaks them breaks: modules_to_save, DoRA, a bias, a rank above vLLM's largest,
tensors it cannot place, LoRA on a layer vLLM does not adapt."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file, save_file

from usf_bios.models.vllm_compat import VllmCheck, check_adapter


def test_a_trained_adapter_passes_and_each_broken_rule_is_named(layout, trained_job, tmp_path):
    folder = layout.job_output(trained_job)
    check = check_adapter(folder)
    assert check.compatible, check.problems
    assert check.rank == 4 and check.max_lora_rank == 8
    command = check.command("/models/base", "ft:tiny:job:1", str(folder))
    assert command == f"vllm serve /models/base --enable-lora --lora-modules ft:tiny:job:1={folder}"
    assert check.command("/b", "n", "/a", quantization="4bit").endswith("--quantization bitsandbytes")

    def broken(name: str, **config_changes) -> list[str]:
        copy = tmp_path / name
        shutil.copytree(folder, copy)
        config = json.loads((copy / "adapter_config.json").read_text())
        config.update(config_changes)
        (copy / "adapter_config.json").write_text(json.dumps(config))
        return check_adapter(copy).problems

    assert broken("save", modules_to_save=["lm_head"]) == [
        "modules_to_save ['lm_head'] is set; vLLM loads only the LoRA matrices"]
    assert broken("dora", use_dora=True) == ["DoRA (use_dora: true) is not supported by vLLM"]
    assert broken("bias", bias="lora_only") == ["bias is 'lora_only'; vLLM serves adapters with bias: none"]
    assert broken("rank", r=1024) == ["rank 1024 is above the largest rank vLLM serves (512)"]
    assert broken("type", peft_type="IA3") == ["peft_type is 'IA3'; vLLM loads LoRA adapters only"]
    big = VllmCheck(rank=20)
    assert big.command("/b", "n", "/a").endswith("--max-lora-rank 32")

    # tensors: an adapter name left inside the keys, and LoRA on the embeddings
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    renamed = {key.replace("lora_A.weight", "lora_A.default.weight"): value for key, value in tensors.items()}
    copy = tmp_path / "names"
    shutil.copytree(folder, copy)
    save_file(renamed, str(copy / "adapter_model.safetensors"))
    [problem] = check_adapter(copy).problems
    assert problem.startswith(f"{len(tensors) // 2} tensor(s) vLLM cannot place, e.g. ") and ".default." in problem
    extra = dict(tensors)
    extra["base_model.model.model.embed_tokens.lora_A.weight"] = torch.zeros(4, 8)
    save_file(extra, str(copy / "adapter_model.safetensors"))
    assert check_adapter(copy).problems == [
        "LoRA on embed_tokens: vLLM applies LoRA only to down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"]
    (copy / "adapter_config.json").unlink()
    assert check_adapter(copy).problems == ["no adapter_config.json in the folder"]
