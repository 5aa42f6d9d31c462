"""Build a model of SmolLM2-135M-Instruct's exact shape with random weights (bf16 safetensors + tokenizer).

The real weights (270 MB) cannot travel to the device machine; the config and tokenizer files can.
Usage: python3 scripts/gpu/make_random_model.py CONFIG_DIR OUT_DIR
"""
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, LlamaForCausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "special_tokens_map.json")


def main(config_dir: str, out_dir: str) -> None:
    src, out = Path(config_dir), Path(out_dir)
    config = AutoConfig.from_pretrained(src)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    params = sum(p.numel() for p in model.parameters())
    print(f"random {config.model_type} model, {params / 1e6:.1f}M parameters → {out}")
    for p in sorted(out.iterdir()):
        print(f"  {p.name} {p.stat().st_size}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
