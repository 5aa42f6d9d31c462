"""Exports of a completed job (a merged model folder, and a GGUF file), made in the background by ``usf-bios export``
in its own process: the server stays responsive and the memory of the merge goes back when it ends. Its stage and
progress come from the status file the command writes (``models/export.py``). No HTTP here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from usf_bios.control.errors import Conflict
from usf_bios.control.jobs import adapter_folder
from usf_bios.control.tables import Job
from usf_bios.models.inspect import folder_size
from usf_bios.storage import StorageLayout, confine

_RUNNING: dict[str, subprocess.Popen] = {}
_LOCK = threading.Lock()


def export_folder(layout: StorageLayout, job: Job) -> Path:
    return confine(layout.root / "data" / "exports", job.id)


def start_export(*, layout: StorageLayout, job: Job, gguf: bool, gguf_dtype: str) -> dict[str, Any]:
    """Start the export of a completed job (Conflict until it has completed, or while one runs)."""
    adapter_folder(layout=layout, job=job)
    folder = export_folder(layout, job)
    with _LOCK:
        running = _RUNNING.get(job.id)
        if running is not None and running.poll() is None:
            raise Conflict(f"an export of job {job.id} is running already")
        folder.mkdir(parents=True, exist_ok=True)
        status = folder / "status.json"
        status.write_text(json.dumps({"stage": "queued", "progress": 0.0}), encoding="utf-8")
        command = [sys.executable, "-m", "usf_bios", "export", job.id, "--merged", str(folder / "merged"),
                   "--status-file", str(status)]
        if gguf:
            command += ["--gguf", str(folder / f"{job.name}.{gguf_dtype}.gguf"), "--gguf-dtype", gguf_dtype]
        log = (folder / "export.log").open("ab")
        env = {**os.environ, "USF_HOME": str(layout.root), "OUTPUT_PATH": str(layout.output),
               "CHECKPOINT_PATH": str(layout.checkpoints), "LOG_PATH": str(layout.logs),
               "USF_MODEL_PATH": str(layout.models), "HF_HOME": str(layout.hf_home),
               "TRANSFORMERS_CACHE": str(layout.hf_hub_cache), "MODELSCOPE_CACHE": str(layout.modelscope_cache)}
        _RUNNING[job.id] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        log.close()
    return export_status(layout=layout, job=job)


def export_status(*, layout: StorageLayout, job: Job) -> dict[str, Any]:
    """``{state: none|running|completed|failed, stage, progress, error, files: [{name, size_bytes}]}``."""
    folder = export_folder(layout, job)
    status_file = folder / "status.json"
    if not status_file.is_file():
        return {"state": "none", "stage": None, "progress": 0.0, "error": None, "files": []}
    state = json.loads(status_file.read_text(encoding="utf-8"))
    stage = state.get("stage")
    process = _RUNNING.get(job.id)
    if stage in ("completed", "failed"):
        result = stage
    elif process is not None and process.poll() is None:
        result = "running"
    else:   # the process ended (or the server restarted) without a final word
        result, state["error"] = "failed", state.get("error") or "the export process ended before it finished"
    files = []
    if result == "completed":
        files = [{"name": "merged/", "size_bytes": folder_size(folder / "merged")}]
        files += [{"name": p.name, "size_bytes": p.stat().st_size} for p in sorted(folder.glob("*.gguf"))]
    return {"state": result, "stage": stage, "progress": state.get("progress", 0.0), "error": state.get("error"),
            "files": files}
