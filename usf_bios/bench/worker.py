"""One side of one benchmark configuration, in its own process (so each starts with an empty GPU and its own
kernels): ``python -m usf_bios.bench.worker CONFIG SIDE OUT.json``. SIDE is ``ours``, ``hf`` (``baseline``), ``hf-best``, ``unsloth``, ``unsloth-nockpt`` or ``context``.

Writes ``{"side", "config", "gpu", "torch", "measurement" | "context", "notes", "error"}`` to OUT.json; an error
(out of memory included) is written, not raised, so the runner can report it beside the other side's numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from usf_bios.bench.configs import MODEL_SHAPES, get_config, workload_config
from usf_bios.bench.measure import Measurement
from usf_bios.bench.models import build_model
from usf_bios.bench.ours import step_rows
from usf_bios.bench.peers import PEERS, UNSLOTH_PLANS, run_hf_best, run_unsloth, save_model_folder, unsloth_missing
from usf_bios.bench.synthetic import workload_examples
from usf_bios.engine.memory import prefer_expandable_segments
from usf_bios.spec import Performance


def _device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def hold_beyond(device: torch.device, gpu_memory_gb: float) -> torch.Tensor:
    """Take the card's memory beyond ``gpu_memory_gb`` (decimal GB of total memory, as a smaller card has) so that
    what follows sees a smaller card's free memory; keep the returned tensor alive while it should."""
    total = torch.cuda.get_device_properties(device).total_memory
    extra = int(total - gpu_memory_gb * 1e9)
    if extra <= 0:
        raise ValueError(f"--gpu-memory-gb {gpu_memory_gb:g}: this card has only {total / 1e9:.1f} GB")
    return torch.empty(extra, dtype=torch.uint8, device=device)


SIDES = ("ours", "hf", "baseline", "context", *PEERS)   # "baseline" is the old name of "hf"
MODEL_FOLDERS = Path(tempfile.gettempdir()) / "usf-bench-models"


def _vocab(cfg: Any) -> int:  # the vocabulary of the config's model shape
    return int(MODEL_SHAPES[cfg.model]["vocab_size"])


def _without_held(measurement: Measurement, held: int) -> Measurement:
    """The peak without the memory held aside for a smaller card."""
    measurement.peak_memory_gb = max(measurement.peak_memory_gb - held / 1e9, 0.0)
    return measurement


def run_side(config_name: str, side: str, performance: Performance, *, layers: int | None = None,
             context_start: int = 32_768, context_limit: int = 524_288, context_resolution: int = 8_192,
             gpu_memory_gb: float | None = None, workload: str = "packed") -> dict[str, Any]:
    cfg = workload_config(get_config(config_name), workload)
    device = _device()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.precision]
    result: dict[str, Any] = {"side": side, "config": cfg.name, "workload": workload, "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "notes": [], "error": None}
    started = time.perf_counter()
    try:
        if side not in SIDES:
            raise ValueError(f"unknown side {side!r}: {', '.join(SIDES)}")
        if side in UNSLOTH_PLANS and (why := unsloth_missing()):
            result["error"] = f"not run: {why}"
            result["missing"] = True
            result["seconds"] = 0.0
            return result
        if gpu_memory_gb and device.type != "cuda":
            raise ValueError("--gpu-memory-gb needs a GPU")
        card: torch.Tensor | None = None

        def hold() -> int:  # the card's memory beyond gpu_memory_gb, held from now on; its bytes
            nonlocal card
            if not gpu_memory_gb:
                return 0
            torch.cuda.empty_cache()  # what a model build left cached is free on the smaller card too
            card = hold_beyond(device, gpu_memory_gb)
            result["notes"].append(f"run as on a {gpu_memory_gb:g} GB card: {card.numel() / 1e9:.2f} GB of this "
                                   "card held aside (left out of the peaks)")
            return card.numel()

        torch.manual_seed(cfg.seed)
        if side in UNSLOTH_PLANS:
            examples = workload_examples(workload, cfg.num_examples, cfg.seq_len, _vocab(cfg), cfg.seed)
            folder = MODEL_FOLDERS / cfg.model
            if not (folder / "config.json").exists():
                built = build_model(cfg.model, "none", device, torch.bfloat16)
                save_model_folder(built, folder)
                del built
                torch.cuda.empty_cache()
                result["notes"].append(f"model folder saved in {time.perf_counter() - started:.1f} s")
            held = hold()   # after the folder is made; Unsloth loads (and quantizes) it within the smaller card
            measurement, notes = run_unsloth(folder, cfg, step_rows(examples, cfg), side)
            result["notes"] += notes
            result["measurement"] = _without_held(measurement, held).to_dict()
            result["seconds"] = round(time.perf_counter() - started, 1)
            return result
        model = build_model(cfg.model, cfg.quantization, device, dtype, layers=layers)
        vocab = model.config.vocab_size
        result["notes"].append(f"model built in {time.perf_counter() - started:.1f} s")
        # held once the model is built: the bench makes a QLoRA model in bf16 on the GPU and quantizes it there
        # (16 GB for an 8B model), where a job loads it quantized shard by shard
        held = hold()
        if side == "context":
            from usf_bios.bench.configs import build_config
            from usf_bios.bench.ours import longest_context

            full = build_config(cfg.model).num_hidden_layers
            if layers is not None and layers < full:  # hold the missing layers' weights' worth of GPU memory
                per_layer = sum(t.numel() * t.element_size() for t in model.model.layers[0].state_dict().values())
                ballast = torch.empty(per_layer * (full - layers), dtype=torch.uint8, device=device)
                result["notes"].append(f"probe of {layers} of {full} layers; {ballast.numel() / 1e9:.2f} GB held "
                                       "for the other layers' weights")

            result["context"] = longest_context(model, cfg, performance, start=context_start, limit=context_limit,
                                                resolution=context_resolution, held_bytes=held,
                                                log=lambda line: print(line, flush=True))
            result["context"]["layers"] = layers or model.config.num_hidden_layers
        else:
            examples = workload_examples(workload, cfg.num_examples, cfg.seq_len, vocab, cfg.seed)
            if side in ("hf", "baseline"):
                from usf_bios.bench.baseline import run_baseline

                measurement = run_baseline(model, examples, cfg)
            elif side == "hf-best":
                measurement, notes = run_hf_best(model, cfg, examples, examples_per_step=cfg.examples_per_step)
                result["notes"] += notes
            else:
                from usf_bios.bench.ours import run_ours

                with tempfile.TemporaryDirectory(prefix="usf-bench-") as workdir:
                    measurement, notes = run_ours(model, examples, cfg, performance, Path(workdir))
                result["notes"] += notes
            result["measurement"] = _without_held(measurement, held).to_dict()
    except torch.OutOfMemoryError as err:
        result["error"] = f"out of GPU memory: {str(err).splitlines()[0]}"
    except Exception as err:  # reported beside the other side's numbers
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usf_bios.bench.worker")
    parser.add_argument("config")
    parser.add_argument("side", choices=SIDES)
    parser.add_argument("out", type=Path)
    parser.add_argument("--performance", default="{}", help="JSON of spec.performance fields for our side")
    parser.add_argument("--layers", type=int, default=None, help="Build only this many decoder layers (a probe)")
    parser.add_argument("--context-start", type=int, default=32_768)
    parser.add_argument("--context-limit", type=int, default=524_288)
    parser.add_argument("--context-resolution", type=int, default=8_192)
    parser.add_argument("--gpu-memory-gb", type=float, default=None,
                        help="Run as on a card with this much memory (decimal GB); the rest is held aside")
    parser.add_argument("--workload", choices=("packed", "full-rows"), default="packed")
    args = parser.parse_args(argv)
    if args.side in UNSLOTH_PLANS and unsloth_missing() is None:
        import unsloth  # noqa: F401  - before transformers, as Unsloth asks (it patches transformers on import)
    if args.side in ("ours", "context"):  # the engine's own allocator setting; the peers run as their users run them
        prefer_expandable_segments()
    performance = Performance.model_validate(json.loads(args.performance))
    result = run_side(args.config, args.side, performance, layers=args.layers, context_start=args.context_start,
                      context_limit=args.context_limit, context_resolution=args.context_resolution,
                      gpu_memory_gb=args.gpu_memory_gb, workload=args.workload)
    args.out.write_text(json.dumps(result, indent=1))
    if result["error"]:
        print(f"{args.config} {args.side}: {result['error']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
