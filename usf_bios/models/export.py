"""Export a trained adapter as a standalone model: base + LoRA merged into one bf16 safetensors folder that plain
``AutoModelForCausalLM.from_pretrained`` loads, and optionally a GGUF file (f16 or bf16, through the ``gguf``
package) that llama.cpp and the project's own importer (``models/gguf.py``) read.

A QLoRA adapter is merged into the base as it lies on disk (bf16, not quantized): the dequantized weights it was
trained against. GGUF is written for Llama-family models (``model_type`` llama or mistral: the same tensor layout).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

Progress = Callable[[str, float], None]
GGUF_TYPES = ("llama", "mistral")


def _quiet(_stage: str, _fraction: float) -> None:
    return None


def _model_card(base: str, adapter: Path, spec: dict[str, Any] | None) -> str:
    hyper = (spec or {}).get("hyperparameters") or {}
    lines = ["# Merged model (USF BIOS)", "", f"Base model: `{Path(base).name}`; LoRA adapter: `{adapter.name}`, "
             f"merged into the base weights (bf16).", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")', "```", ""]
    if hyper:
        lines += ["Trained with: " + ", ".join(f"{k}={hyper[k]}" for k in ("lora_r", "lora_alpha", "learning_rate",
                                                                           "num_epochs", "max_steps") if k in hyper), ""]
    return "\n".join(lines)


def merge_adapter(base: str | Path, adapter: str | Path, out_dir: str | Path, *, trust_remote_code: bool = False,
                  spec: dict[str, Any] | None = None, progress: Progress = _quiet) -> Path:
    """Write ``out_dir``: the base with the adapter merged in, bf16 safetensors, config, tokenizer, model card
    (written aside, then renamed into place; an existing ``out_dir`` is replaced)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, out_dir = Path(adapter), Path(out_dir).expanduser().resolve()
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} holds no adapter (adapter_config.json is missing)")
    progress("loading", 0.05)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, local_files_only=True,
                                                 trust_remote_code=trust_remote_code)
    tokenizer_from = adapter if (adapter / "tokenizer_config.json").is_file() else Path(base)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from, local_files_only=True, trust_remote_code=trust_remote_code)
    progress("merging", 0.35)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.config.architectures = [type(merged).__name__]
    progress("saving", 0.6)
    tmp = out_dir.with_name(f".{out_dir.name}.exporting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(_model_card(str(base), adapter, spec), encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    progress("merged", 0.7)
    return out_dir


def _permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotary layout of q/k rows → llama.cpp's (the importer's reverse_permute undoes it)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _vocab(folder: Path) -> tuple[list[str], list[int]]:
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    tokens, types = [], []
    for i in range(max(by_id) + 1):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.CONTROL if i in special else
                     gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.NORMAL)
    return tokens, types


def write_gguf(model_dir: str | Path, gguf_path: str | Path, *, dtype: str = "bf16", progress: Progress = _quiet) -> Path:
    """A GGUF file of a plain (merged) Llama-family model folder, its 2-D weights in ``dtype`` (bf16 or f16), norms
    in f32, the tokenizer (BPE as llama.cpp's 'gpt2' model, merges, special tokens, chat template) in its metadata."""
    import gguf
    from safetensors import safe_open

    model_dir, gguf_path = Path(model_dir), Path(gguf_path).expanduser().resolve()
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") not in GGUF_TYPES:
        raise ValueError(f"GGUF export supports {', '.join(GGUF_TYPES)} models, not {config.get('model_type')!r}")
    if dtype not in ("bf16", "f16"):
        raise ValueError(f"GGUF dtype must be bf16 or f16, not {dtype!r}")
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    tmp = gguf_path.with_name(f".{gguf_path.name}.exporting")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
                                    or 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if dtype == "bf16" else gguf.LlamaFileType.MOSTLY_F16)
    tokens, types = _vocab(model_dir)
    writer.add_vocab_size(max(len(tokens), config["vocab_size"]))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    files = sorted(model_dir.glob("*.safetensors"))
    for index, file in enumerate(files):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                target = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if target is None:
                    raise ValueError(f"{key}: no GGUF name for this tensor")
                tensor = handle.get_tensor(key).float()
                if key.endswith("self_attn.q_proj.weight"):
                    tensor = _permute(tensor, heads)
                elif key.endswith("self_attn.k_proj.weight"):
                    tensor = _permute(tensor, kv_heads)
                data = tensor.numpy()
                if tensor.ndim == 1:
                    writer.add_tensor(target, data)
                elif dtype == "f16":
                    writer.add_tensor(target, data.astype("float16"))
                else:
                    writer.add_tensor(target, gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16),
                                      raw_dtype=gguf.GGMLQuantizationType.BF16)
        progress("gguf", 0.7 + 0.25 * (index + 1) / len(files))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(gguf_path)
    return gguf_path


def export_adapter(base: str, adapter: Path, *, merged_dir: Path, gguf_path: Path | None = None,
                   gguf_dtype: str = "bf16", trust_remote_code: bool = False, spec: dict[str, Any] | None = None,
                   status_file: Path | None = None) -> dict[str, Any]:
    """Merge (and write the GGUF); with ``status_file`` the stage, progress and result are written there as JSON
    as the work goes (what ``GET /api/jobs/{id}/export`` reads)."""
    started = time.time()

    def report(stage: str, fraction: float, **extra: Any) -> None:
        if status_file is not None:
            state = {"stage": stage, "progress": round(fraction, 3), "started_at": started, **extra}
            tmp = status_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(state), encoding="utf-8")
            tmp.replace(status_file)

    try:
        merged = merge_adapter(base, adapter, merged_dir, trust_remote_code=trust_remote_code, spec=spec,
                               progress=report)
        written = write_gguf(merged, gguf_path, dtype=gguf_dtype, progress=report) if gguf_path else None
    except Exception as exc:
        report("failed", 1.0, error=f"{type(exc).__name__}: {exc}")
        raise
    result = {"merged": str(merged), "gguf": str(written) if written else None}
    report("completed", 1.0, finished_at=time.time(), **result)
    return result
