"""Run by tests/inference/test_vllm_backend.py in an interpreter that has vllm: the inference engine on its vLLM
path answers the requests the test sends on stdin (JSON) and prints what it saw (JSON) as its last line."""

from __future__ import annotations

import json
import sys
import time

from usf_bios.inference.engine import Generation, InferenceEngine
from usf_bios.inference.loaded import BaseKey, Target
from usf_bios.inference.sampling import RequestError, SamplingParams


def completion(gen: Generation) -> dict:
    done = gen.result()
    return {"text": done.text, "finish": done.finish_reason, "prompt_tokens": done.prompt_tokens,
            "tokens": done.completion_tokens}


def first_text(gen: Generation) -> list[tuple]:
    items = []
    for item in gen:
        items.append(item)
        if item[0] in ("text", "done", "error"):
            return items
    return items


def main() -> None:
    job = json.loads(sys.stdin.read())
    base, adapters, question = BaseKey(job["base"]), job["adapters"], job["messages"]
    engine = InferenceEngine(backend="vllm", max_batch=8)
    greedy = SamplingParams(temperature=0, max_tokens=job["max_tokens"])
    seen: dict = {"backend": engine.backend}
    # the base and both adapters, submitted together
    gens = [engine.submit(Target(base, a), messages=question, params=greedy) for a in [None, *adapters]]
    seen["greedy"] = [completion(g) for g in gens]
    seen["stopped"] = completion(engine.submit(Target(base, adapters[0]), messages=question,
                                               params=SamplingParams(temperature=0, max_tokens=job["max_tokens"],
                                                                     stop=(job["stop"],))))
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=7)
    seen["seeded"] = [completion(engine.submit(Target(base, adapters[1]), messages=question, params=seeded))
                      for _ in range(2)]
    # a request joins a running one: one batch for both, the short one ends first
    batches = engine.batches
    long = engine.submit(Target(base), prompt="hello world", params=SamplingParams(temperature=0, max_tokens=200))
    head = first_text(long)
    short = engine.submit(Target(base, adapters[0]), messages=question, params=SamplingParams(temperature=0, max_tokens=2))
    short_done = completion(short)
    short_at = time.monotonic()
    rest = list(long)
    long_at = time.monotonic()
    seen["joined"] = {"batches": engine.batches - batches, "short": short_done, "long_items": len(head + rest),
                      "long_end": rest[-1][:2] if rest else head[-1][:2], "short_first": short_at <= long_at}
    # a cancel after the first text
    cancelled = engine.submit(Target(base), prompt="hello world", params=SamplingParams(temperature=0, max_tokens=200))
    head = first_text(cancelled)
    cancelled.cancel()
    seen["cancelled"] = [list(i[:2]) for i in [*head, *cancelled]][-1]
    try:
        engine.submit(Target(base, job["missing"]), messages=question, params=greedy).result()
        seen["missing"] = None
    except RequestError as err:
        seen["missing"] = {"field": err.field, "reason": err.reason}
    seen["describe"] = engine.describe()
    engine.close()
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
