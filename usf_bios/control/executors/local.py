"""Local executor: one engine process per job, in its own session (process group), on this host.

The process outlives the server on purpose: a restarted server finds it by pid and start time
(so a reused pid is never mistaken for the job) and follows it again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from usf_bios.settings import Settings
from usf_bios.storage import StorageLayout


@dataclass(frozen=True)
class ProcessRef:
    pid: int
    start_time: str   # /proc/{pid}/stat field 22: clock ticks after boot when the process started


def process_start_time(pid: int) -> str | None:
    """The process's start time, or None when no such process runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def engine_environment(settings: Settings, gpu_ids: list[int]) -> dict[str, str]:
    """The job's environment: the storage paths of this server, and only its GPUs."""
    env = dict(os.environ)
    env.update({
        "USF_HOME": str(settings.usf_home), "OUTPUT_PATH": str(settings.output_path),
        "CHECKPOINT_PATH": str(settings.checkpoint_path), "LOG_PATH": str(settings.log_path),
        "USF_MODEL_PATH": str(settings.model_path), "HF_HOME": str(settings.hf_home),
        "TRANSFORMERS_CACHE": str(settings.transformers_cache), "MODELSCOPE_CACHE": str(settings.modelscope_cache),
        "SUPPORTED_MODEL_SOURCES": ",".join(settings.supported_model_sources),
        "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in gpu_ids),
        "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
    })
    return env


class LocalExecutor:
    def __init__(self, layout: StorageLayout, settings: Settings):
        self.layout, self.settings = layout, settings
        self._children: dict[int, subprocess.Popen] = {}

    def start(self, job_id: str, gpu_ids: list[int]) -> ProcessRef:
        out = self.layout.logs / f"{job_id}.out"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("ab") as handle:
            proc = subprocess.Popen([sys.executable, "-m", "usf_bios.engine.run", job_id], stdout=handle,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                    env=engine_environment(self.settings, gpu_ids), cwd=self.layout.root)
        self._children[proc.pid] = proc
        return ProcessRef(proc.pid, process_start_time(proc.pid) or "")

    def is_alive(self, ref: ProcessRef) -> bool:
        child = self._children.get(ref.pid)
        if child is not None:
            return child.poll() is None
        return ref.start_time != "" and process_start_time(ref.pid) == ref.start_time

    def exit_code(self, ref: ProcessRef) -> int | None:
        """Known only for processes this server started (and reaped)."""
        child = self._children.get(ref.pid)
        return child.poll() if child is not None else None

    def forget(self, ref: ProcessRef) -> None:
        self._children.pop(ref.pid, None)

    def send_signal(self, ref: ProcessRef, sig: signal.Signals) -> None:
        """Signal the job's whole process group, if the process is still the job's."""
        if self.is_alive(ref):
            try:
                os.killpg(ref.pid, sig)
            except ProcessLookupError:
                pass
