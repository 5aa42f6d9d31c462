"""The files of a finished job in ``data/output/{job_id}/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from usf_bios.engine.events import read_events, training_log
from usf_bios.spec import JobSpec


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def model_card(spec: JobSpec, base_path: str, points: list[dict[str, Any]], facts: dict[str, Any]) -> str:
    hp = spec.hyperparameters
    final_loss = next((p["loss"] for p in reversed(points) if p.get("loss") is not None), None)
    final_val = next((p["validation_loss"] for p in reversed(points) if p.get("validation_loss") is not None), None)
    fmt = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
    rows = "\n".join(f"| {key} | {value} |" for key, value in hp.model_dump(mode="json").items())
    return f"""# {spec.name}

A LoRA adapter trained with USF BIOS.

- **Base model**: `{spec.base_model}` (`{base_path}`)
- **Dataset**: {", ".join(f"`{name}`" + (f" × {weight:g}" if spec.datasets else "") for name, weight in spec.dataset_refs())} ({facts['dataset_format']}, {facts['train_examples']} training / {facts['validation_examples']} validation examples)
- **Steps**: {facts['total_steps']} on {facts['device']} in {facts['precision']}
- **Final training loss**: {fmt(final_loss)} · **final validation loss**: {fmt(final_val)}

## Hyperparameters
| field | value |
|---|---|
{rows}

## Load it
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel

base = AutoModelForCausalLM.from_pretrained("{base_path}")
model = PeftModel.from_pretrained(base, "<this folder>")
tokenizer = AutoTokenizer.from_pretrained("<this folder>")
```
"""


def write_outputs(folder: Path, model: Any, tokenizer: Any, spec: JobSpec, base_path: Path, events_path: Path,
                  facts: dict[str, Any], adapter: dict[str, Any] | None = None) -> None:
    """Adapter, tokenizer, training_args.json, training_log.json and README.md (job.yaml is already there);
    ``adapter``: the adapter's full tensors when the model is sharded (FSDP2)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, **({"state_dict": adapter} if adapter is not None else {}))
    tokenizer.save_pretrained(folder)
    points = training_log(read_events(events_path)[0])
    args = {**spec.hyperparameters.model_dump(mode="json"), "base_model": spec.base_model,
            "base_model_path": str(base_path), "dataset": spec.dataset, "datasets": spec.model_dump(mode="json")["datasets"], **facts, "versions": _versions()}
    (folder / "training_args.json").write_text(json.dumps(args, indent=2))
    (folder / "training_log.json").write_text(json.dumps(points, indent=2))
    (folder / "README.md").write_text(model_card(spec, str(base_path), points, facts))
