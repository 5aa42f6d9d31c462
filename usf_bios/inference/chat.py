"""Ask a base model, or a base model with a trained adapter, a question (greedy decoding)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_chat_model(base_path: Path, adapter: Path | None = None, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """The base model in fp32 on the CPU (or bf16 on a GPU), with the adapter applied when given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, local_files_only=True,
                                                 trust_remote_code=trust_remote_code).to(device)
    tokenizer = AutoTokenizer.from_pretrained(adapter or base_path, local_files_only=True,
                                              trust_remote_code=trust_remote_code)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, tokenizer


@torch.no_grad()
def answer(model: Any, tokenizer: Any, question: str, max_new_tokens: int = 48) -> str:
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True).to(model.device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
