"""Local executor: one engine process per job, in its own session (process group), on this host.

The process outlives the server on purpose: a restarted server finds it by pid and start time (so a reused pid is
never mistaken for the job) and follows it again. Its handle is '<pid>:<start time>'; its events come from the
job's events file, read from a byte offset.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from usf_bios.control.executors.base import Progress, Resources
from usf_bios.control.gpus import list_gpus
from usf_bios.engine.events import read_events
from usf_bios.settings import Settings
from usf_bios.storage import StorageLayout


@dataclass(frozen=True)
class ProcessRef:
    pid: int
    start_time: str   # /proc/{pid}/stat field 22: clock ticks after boot when the process started

    @classmethod
    def parse(cls, handle: str) -> "ProcessRef | None":
        pid, _, start = handle.partition(":")
        return cls(int(pid), start) if pid.isdigit() else None

    def __str__(self) -> str:
        return f"{self.pid}:{self.start_time}"


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


def storage_environment(settings: Settings) -> dict[str, str]:
    """What an engine process needs to find this server's storage (the ray executor sends only this)."""
    return {
        "USF_HOME": str(settings.usf_home), "OUTPUT_PATH": str(settings.output_path),
        "CHECKPOINT_PATH": str(settings.checkpoint_path), "LOG_PATH": str(settings.log_path),
        "USF_MODEL_PATH": str(settings.model_path), "HF_HOME": str(settings.hf_home),
        "TRANSFORMERS_CACHE": str(settings.transformers_cache), "MODELSCOPE_CACHE": str(settings.modelscope_cache),
        "SUPPORTED_MODEL_SOURCES": ",".join(settings.supported_model_sources),
        "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
    }


def engine_environment(settings: Settings, gpu_ids: list[int]) -> dict[str, str]:
    """The job's environment: the storage paths of this server, and only its GPUs."""
    env = dict(os.environ)
    env.update(storage_environment(settings))
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpu_ids)
    return env


class LocalExecutor:
    name = "local"

    def __init__(self, layout: StorageLayout, settings: Settings):
        self.layout, self.settings = layout, settings
        self._children: dict[int, subprocess.Popen] = {}
        self._stopping: set[int] = set()      # pids sent SIGTERM by this process
        self._gpu_count: int | None = None

    def resources(self) -> Resources:
        if self._gpu_count is None:
            self._gpu_count = len(list_gpus())
        return Resources(gpus=self._gpu_count, cpu_slots=self.settings.max_cpu_jobs)

    def start(self, job_id: str, gpu_ids: list[int]) -> str:
        out = self.layout.logs / f"{job_id}.out"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("ab") as handle:
            proc = subprocess.Popen([sys.executable, "-m", "usf_bios.engine.run", job_id], stdout=handle,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                    env=engine_environment(self.settings, gpu_ids), cwd=self.layout.root)
        self._children[proc.pid] = proc
        return str(ProcessRef(proc.pid, process_start_time(proc.pid) or ""))

    def poll(self, handle: str | None, cursor: int, job_id: str) -> Progress:
        events, cursor = read_events(self.layout.job_events(job_id), cursor)
        ref = ProcessRef.parse(handle) if handle else None
        alive = ref is not None and self._is_alive(ref)
        exit_code = None
        if ref is not None and not alive and ref.pid in self._children:
            exit_code = self._children[ref.pid].poll()
        return Progress(events=events, cursor=cursor, alive=alive, exit_code=exit_code)

    def cancel(self, handle: str, kill: bool) -> None:
        """SIGTERM once (the engine checkpoints and ends as cancelled), SIGKILL when ``kill``; to the process group,
        and only while the process is still the job's."""
        ref = ProcessRef.parse(handle)
        if ref is None or not self._is_alive(ref):
            return
        if not kill and ref.pid in self._stopping:
            return
        self._stopping.add(ref.pid)
        sig = signal.SIGKILL if kill else signal.SIGTERM
        try:
            os.killpg(ref.pid, sig)
        except ProcessLookupError:   # not a group leader: an adopted `usf-bios train` started inside a shell's group
            try:
                os.kill(ref.pid, sig)
            except ProcessLookupError:
                pass

    def describe(self, handle: str | None) -> str:
        ref = ProcessRef.parse(handle) if handle else None
        return f"local process {ref.pid}" if ref else "local"

    def forget(self, handle: str) -> None:
        ref = ProcessRef.parse(handle)
        if ref is not None:
            self._children.pop(ref.pid, None)
            self._stopping.discard(ref.pid)

    def _is_alive(self, ref: ProcessRef) -> bool:
        child = self._children.get(ref.pid)
        if child is not None:
            return child.poll() is None
        return ref.start_time != "" and process_start_time(ref.pid) == ref.start_time
