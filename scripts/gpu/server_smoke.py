"""Drive a running `usf-bios serve` on the GPU machine: NVML sees the GPU, a 1-GPU job trains on it
(bf16 and 4-bit), a 2-GPU job on a 1-GPU host fails with the reason. Prints a summary."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx

api = httpx.Client(base_url=sys.argv[1] + "/api", timeout=120)
model_dir, dataset = Path(sys.argv[2]), Path(sys.argv[3])
print("system:", json.dumps(api.get("/system").json()))
print("model:", api.post("/models", json={"name": "smollm2", "source": "local", "path": str(model_dir)}).status_code)
print("dataset:", api.post("/datasets", files={"file": (dataset.name, dataset.read_bytes())}, data={"name": "chat"}).status_code)


def spec(name: str, gpus: int, quantization: str = "none") -> dict:
    return {"name": name, "base_model": "smollm2", "dataset": "chat", "gpu_config": {"num_gpus": gpus, "gpu_type": "H100"},
            "hyperparameters": {"max_steps": 20, "batch_size": 4, "gradient_accumulation_steps": 2, "max_seq_length": 2048,
                                "precision": "bf16", "quantization": quantization, "eval_steps": 10, "save_steps": 10}}


print("estimate:", json.dumps(api.post("/jobs/estimate", json=spec("e", 1)).json()))
jobs = [api.post("/jobs", json=spec(n, g, q)).json() for n, g, q in
        (("bf16-1gpu", 1, "none"), ("qlora-1gpu", 1, "4bit"), ("needs-2gpus", 2, "none"))]
deadline = time.monotonic() + 400
while time.monotonic() < deadline:
    states = [api.get(f"/jobs/{j['id']}").json() for j in jobs]
    if all(s["status"] in ("completed", "failed", "cancelled") for s in states):
        break
    time.sleep(1)
for state in states:
    points = api.get(f"/jobs/{state['id']}/metrics").json()
    last = points[-1] if points else {}
    print(f"{state['name']:12} {state['status']:10} steps={len(points)} attempts={state['attempts']} "
          f"loss={last.get('loss')} gpu_memory_gb={last.get('gpu_memory_gb')} tok/s={last.get('tokens_per_second')} "
          f"error={state['error']}")
