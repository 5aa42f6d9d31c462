"""Inference speed: time to first token and tokens/s of the inference engine, 1 stream and N concurrent streams,
against plain transformers ``generate`` (one request after another, and one left-padded batch), and the cost of
switching adapters. Prints one JSON object (docs/benchmarks.md, "Serving adapters").

    python scripts/bench_inference.py --model ~/.usf-bios/models/HuggingFaceTB--SmolLM2-135M-Instruct \
        --adapter data/output/JOB_A --adapter data/output/JOB_B --tokens 64 --streams 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from usf_bios.inference.engine import InferenceEngine
from usf_bios.inference.loaded import BaseKey, Target
from usf_bios.inference.sampling import SamplingParams

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
           "Describe the water cycle.", "Tell me about the history of tea.", "How do airplanes fly?",
           "Write a poem about autumn leaves.", "What makes a good friend?", "Describe a busy market in the morning."]


def timed_stream(gen) -> tuple[float, float, int]:
    """(seconds to the first text, seconds to the end, completion tokens) of one generation, from its submission."""
    first = None
    for item in gen:
        if item[0] == "text" and first is None:
            first = time.perf_counter()
        if item[0] == "error":
            raise item[1]
        if item[0] == "done":
            end = time.perf_counter()
            return (first or end) - gen.submitted, end - gen.submitted, item[2]
    raise RuntimeError("no done")


def engine_run(engine: InferenceEngine, targets: list[Target], tokens: int) -> dict:
    """Submit one request per target at once; each stream is read by its own thread as its tokens arrive."""
    import threading

    params = SamplingParams(temperature=0, max_tokens=tokens)
    started = time.perf_counter()
    gens = [engine.submit(t, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], params=params)
            for i, t in enumerate(targets)]
    results: list = [None] * len(gens)

    def read(i: int) -> None:
        results[i] = timed_stream(gens[i])

    readers = [threading.Thread(target=read, args=(i,)) for i in range(len(gens))]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    wall = time.perf_counter() - started
    total = sum(r[2] for r in results)
    return {"streams": len(targets), "ttft_s_mean": round(statistics.mean(r[0] for r in results), 3),
            "ttft_s_max": round(max(r[0] for r in results), 3), "tokens": total, "wall_s": round(wall, 2),
            "tokens_per_s": round(total / wall, 1),
            "per_stream_tokens_per_s": round(statistics.mean((r[2] - 1) / max(r[1] - r[0], 1e-9) for r in results), 1)}


def hf_run(model, tokenizer, n: int, tokens: int, batched: bool) -> dict:
    """Plain ``generate``, greedy: n requests one after another (a request's first token comes after every earlier
    request's last), or as one left-padded batch. The first token's time is a separate 1-token ``generate`` of the
    same input, left out of the wall time."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                           add_generation_prompt=True, tokenize=False) for i in range(n)]
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    wall, generated, firsts = 0.0, 0, []
    for group in [texts] if batched else [[t] for t in texts]:
        inputs = tokenizer(group, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=pad)
            firsts.append(wall + time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, pad_token_id=pad)
            wall += time.perf_counter() - t0
        new = out[:, inputs["input_ids"].shape[1]:]
        generated += int((new != pad).sum())
    return {"streams": n, "mode": "one batch" if batched else "one after another", "tokens": generated,
            "wall_s": round(wall, 2), "tokens_per_s": round(generated / wall, 1),
            "ttft_s_mean": round(statistics.mean(firsts), 3), "ttft_s_max": round(max(firsts), 3)}


def switch_cost(engine: InferenceEngine, base: BaseKey, adapters: list[str], rounds: int) -> dict:
    """Mean seconds of a 1-token request on the same adapter, and alternating between two loaded adapters."""
    params = SamplingParams(temperature=0, max_tokens=1)
    question = [{"role": "user", "content": "Hi"}]

    def mean_time(sequence: list[str]) -> float:
        times = []
        for folder in sequence:
            t0 = time.perf_counter()
            engine.submit(Target(base, folder), messages=question, params=params).result()
            times.append(time.perf_counter() - t0)
        return statistics.mean(times)

    mean_time(adapters)   # both loaded
    same = mean_time([adapters[0]] * rounds)
    alternating = mean_time([adapters[i % 2] for i in range(rounds)])
    return {"same_adapter_s": round(same, 4), "alternating_s": round(alternating, 4),
            "switch_cost_ms": round((alternating - same) * 1000, 2)}


SHAPES = {"llama-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 500000.0},
          # scripts/bench_decode_overhead.py: the matrix products cost little, the host's per-token work shows
          "deep-thin": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 32,
                        "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16}}


def random_model(source: str, shape: str | None, folder: str, adapters: int, device: str) -> tuple[str, list[str]]:
    """A model of ``source``'s config (or a named shape on its tokenizer) with random weights, and random adapters
    (speed does not depend on the weights; random ones rarely end early, so every request runs its full length)."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    for key, value in SHAPES.get(shape or "", {}).items():
        setattr(config, key, value)
    config.tie_word_embeddings = shape is None and config.tie_word_embeddings
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(source):
        if name.startswith(("tokenizer", "chat_template", "generation_config")):
            shutil.copy(os.path.join(source, name), folder)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    made = []
    for i in range(adapters):
        torch.manual_seed(i + 1)
        peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                init_lora_weights=False))
        for name, weight in peft.named_parameters():
            if "lora_B" in name:
                weight.data *= 0.01
        peft.save_pretrained(f"{folder}-adapter{i}")
        model = peft.unload()
        made.append(f"{folder}-adapter{i}")
    del model
    return folder, made


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="a model folder (or, with --random, the source of its config)")
    parser.add_argument("--adapter", action="append", default=[])
    parser.add_argument("--random", metavar="FOLDER", help="build a random-weight copy (and 2 adapters) there first")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="with --random: this shape on the model's tokenizer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch threads on the CPU")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--backend", default="transformers", choices=["transformers", "vllm"],
                        help="the inference engine's path (USF_INFERENCE_BACKEND)")
    parser.add_argument("--engine-only", action="store_true", help="no transformers generate baseline")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model_path, adapters = os.path.abspath(os.path.expanduser(args.model)), args.adapter
    if args.random:
        model_path, adapters = random_model(model_path, args.shape, args.random, 2, args.device)
    device = torch.device(args.device)
    base = BaseKey(model_path)
    engine = InferenceEngine(max_batch=args.streams, queue_size=max(32, args.streams), device=device,
                             backend=args.backend)
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
                    "shape": args.shape or os.path.basename(args.model), "random_weights": bool(args.random),
                    "tokens_per_request": args.tokens, "backend": args.backend}
    adapter = adapters[0] if adapters else None
    engine_run(engine, [Target(base, adapter)], 4)   # warm: the base and the adapter load
    report["base_load_s"] = engine.describe()["bases"][0]["load_seconds"]
    report["engine_1"] = engine_run(engine, [Target(base, adapter)], args.tokens)
    report["engine_n_same_adapter"] = engine_run(engine, [Target(base, adapter)] * args.streams, args.tokens)
    if len(adapters) >= 2:
        t0 = time.perf_counter()
        engine_run(engine, [Target(base, adapters[1])], 1)
        report["second_adapter_first_request_s"] = round(time.perf_counter() - t0, 3)
        mixed = [Target(base, adapters[i % 2] if i % 3 else None) for i in range(args.streams)]
        report["engine_n_mixed_adapters_and_base"] = engine_run(engine, mixed, args.tokens)
        report["switch"] = switch_cost(engine, base, adapters[:2], args.rounds)
    state = engine.describe()["bases"][0]
    report["loads"], report["adapter_loads"] = state["loads"], state["adapter_loads"]
    engine.close()
    print(json.dumps(report), file=sys.stderr, flush=True)   # the engine's half, in case the baseline is cut short
    if args.engine_only:
        print(json.dumps(report, indent=1))
        return

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    hf_run(model, tokenizer, 1, 4, batched=False)   # warm
    report["hf_generate_1"] = hf_run(model, tokenizer, 1, args.tokens, batched=False)
    report["hf_generate_n_sequential"] = hf_run(model, tokenizer, args.streams, args.tokens, batched=False)
    report["hf_generate_n_batched"] = hf_run(model, tokenizer, args.streams, args.tokens, batched=True)
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
