"""Steps the API tests share: upload, register, submit, wait."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import httpx

from tests.tiny import build_tiny_model


def upload_dataset(client: httpx.Client, path: Path, name: str | None = None) -> dict[str, Any]:
    data = {"name": name} if name else {}
    response = client.post("/datasets", files={"file": (path.name, path.read_bytes(), "application/octet-stream")}, data=data)
    assert response.status_code == 201, response.text
    return response.json()


def register_model(client: httpx.Client, name: str, folder: Path) -> dict[str, Any]:
    response = client.post("/models", json={"name": name, "source": "local", "path": str(folder)})
    assert response.status_code == 201, response.text
    return response.json()


def tiny_model_in(home: Path, template: Path | None = None, name: str = "test--tiny", **kwargs: Any) -> Path:
    """A tiny random Llama under the server's USF_MODEL_PATH."""
    folder = home / "models" / name
    if template is not None:
        shutil.copytree(template, folder)
    else:
        build_tiny_model(folder, **kwargs)
    return folder


def job_spec(model: str, dataset: str, name: str = "api-job", **hp: Any) -> dict[str, Any]:
    hyper = {"max_steps": 10, "learning_rate": 3e-3, "batch_size": 2, "gradient_accumulation_steps": 1,
             "max_seq_length": 128, "lora_r": 4, "lora_alpha": 8, "val_split": 0.1, "eval_steps": 5, "save_steps": 5,
             "precision": "fp32", "gradient_checkpointing": False}
    hyper.update(hp)
    return {"name": name, "base_model": model, "dataset": dataset, "hyperparameters": hyper, "gpu_config": {"num_gpus": 0}}


def submit(client: httpx.Client, spec: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/jobs", json=spec)
    assert response.status_code == 201, response.text
    return response.json()


def wait_for(client: httpx.Client, job_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} never got there: {job}")


def final(job: dict[str, Any]) -> bool:
    return job["status"] in ("completed", "failed", "cancelled")


def run_async(coroutine):
    """asyncio.run in a thread of its own: a test before this one in the same worker process (a browser test's
    Playwright) may leave an event loop set on the main thread, where asyncio.run refuses to start."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
