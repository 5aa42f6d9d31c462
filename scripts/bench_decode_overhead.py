"""The host's share of a decoding step: a deep, thin random Llama (32 layers of width 64 on SmolLM2's 49k vocabulary,
one r=16 LoRA adapter on every linear layer), so that the matrix products cost little and the per-token Python of
the engine and of ``generate`` is most of the time. In one run: the engine's milliseconds per decoded token for one
stream and for N streams in one batch, and plain ``generate`` through peft on the same base and adapter, 1 request
and N as one left-padded batch. Prints one JSON object (docs/benchmarks.md, "Serving adapters").

    python scripts/bench_decode_overhead.py --model .dev/smol --random /tmp/deep-thin --threads 1 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from scripts.bench_inference import PROMPTS, random_model
from usf_bios.inference.engine import InferenceEngine
from usf_bios.inference.loaded import BaseKey, Target
from usf_bios.inference.sampling import SamplingParams


Clock = tuple[float, float]   # (wall seconds, this process's CPU seconds)


def clock() -> Clock:
    return time.perf_counter(), time.process_time()


def per_step(first: Clock, last: Clock, steps: int) -> tuple[float, float]:
    """(wall, CPU) milliseconds a step. CPU time is the steadier of the two on a shared machine: the process's
    own work, whatever else runs beside it (torch on one thread: no pool of its own)."""
    return (last[0] - first[0]) * 1000 / steps, (last[1] - first[1]) * 1000 / steps


def engine_step(engine: InferenceEngine, target: Target, streams: int, tokens: int) -> tuple[tuple, list[str]]:
    """One batch of ``streams`` requests through the engine, each stream read by its own thread as a server's
    would be: from the batch's first text (after the prefill) to its last ``done``, over the steps between."""
    import threading

    params = SamplingParams(temperature=0, max_tokens=tokens)
    with engine._cond:   # the worker takes none before all wait: one batch
        gens = [engine.submit(target, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                              params=params) for i in range(streams)]
    marks: list[list[Clock]] = [[] for _ in gens]
    answers: list[str] = [""] * len(gens)

    def read(i: int) -> None:
        parts = []
        for item in gens[i]:
            if item[0] == "error":
                raise item[1]
            if item[0] == "text":
                parts.append(item[1])
            if item[0] in ("text", "done"):
                marks[i].append(clock())
        answers[i] = "".join(parts)

    readers = [threading.Thread(target=read, args=(i,)) for i in range(len(gens))]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    return per_step(min(m[0] for m in marks), max(m[-1] for m in marks), tokens - 1), answers


def generate_step(model, tokenizer, streams: int, tokens: int) -> tuple[tuple, list[str]]:
    """``generate``'s step: (a ``tokens``-token call − a 1-token call) over ``tokens`` − 1 steps, greedy, with no
    end-of-sequence token (a random model could end early; the engine's rows run their full length here too)."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                           add_generation_prompt=True, tokenize=False) for i in range(streams)]
    tokenizer.padding_side = "left"
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options = {"do_sample": False, "pad_token_id": pad, "eos_token_id": None}
    with torch.no_grad():
        t0 = clock()
        model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, **options)
        t1 = clock()
        out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, **options)
        t2 = clock()
    prefill = (t1[0] - t0[0], t1[1] - t0[1])
    step = per_step((t1[0] + prefill[0], t1[1] + prefill[1]), t2, tokens - 1)
    return step, tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def summary(streams: int, runs: list[tuple[float, float]]) -> dict:
    wall, cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    return {"streams": streams, "wall_ms_per_step": round(wall, 2), "cpu_ms_per_step": round(cpu, 2),
            "cpu_ms_per_token": round(cpu / streams, 2), "runs_wall_cpu_ms": [[round(w, 2), round(c, 2)]
                                                                           for w, c in runs]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="the source of the tokenizer and config (SmolLM2's)")
    parser.add_argument("--random", metavar="FOLDER", required=True, help="where the random model is built")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    model_path, adapters = random_model(os.path.abspath(os.path.expanduser(args.model)), "deep-thin", args.random,
                                        1, "cpu")
    base, adapter = BaseKey(model_path), adapters[0]
    report: dict = {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "load_average_start": os.getloadavg(), "shape": "deep-thin", "tokens_per_request": args.tokens,
                    "repeats": args.repeats}
    engine = InferenceEngine(max_batch=args.streams, queue_size=max(32, args.streams), device=device)
    target = Target(base, adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
                                      adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    engine_step(engine, target, 1, 4)   # warm: the base and the adapter load
    generate_step(model, tokenizer, 1, 4)
    cases = {"engine_1": lambda: engine_step(engine, target, 1, args.tokens),
             "generate_1": lambda: generate_step(model, tokenizer, 1, args.tokens),
             "engine_n": lambda: engine_step(engine, target, args.streams, args.tokens),
             "generate_n": lambda: generate_step(model, tokenizer, args.streams, args.tokens)}
    runs: dict[str, list] = {name: [] for name in cases}
    texts: dict[str, list[str]] = {}
    for _ in range(args.repeats):   # interleaved: a change of the machine's load falls on every case alike
        for name, case in cases.items():
            step, texts[name] = case()
            runs[name].append(step)
    engine.close()
    for name, case_runs in runs.items():
        report[name] = summary(1 if name.endswith("_1") else args.streams, case_runs)
    report["same_text_as_generate"] = {"1": texts["engine_1"] == texts["generate_1"],
                                       "n": texts["engine_n"] == texts["generate_n"]}
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
