"""Local executor: one engine process per job, in its own session (process group), on this host.

The process outlives the server on purpose: a restarted server finds it by pid and start time (so a reused pid is
never mistaken for the job) and follows it again. Its handle is '<pid>:<start time>'; its events come from the
job's events file, read from a byte offset.

A job of several ranks (``gpu_config.world_size`` > 1: several GPUs, or ``num_processes`` on the CPU) runs under
``torchrun`` (``python -m torch.distributed.run --standalone``: a rendezvous on a free loopback port of its own,
one rank per GPU of the job). The handle is then torchrun's pid: torchrun starts each rank in a session of its
own, forwards a SIGTERM to every rank (each saves nothing but rank 0 the checkpoint, and all stop at the same
step), tears the others down when one dies (its exit status is then 1), and each rank is killed by the kernel if
torchrun itself dies (``engine.distributed.die_with_launcher``), so a SIGKILL of torchrun's group ends them all.
A CPU job of N ranks takes one CPU slot; its ranks share that slot's cores (``OMP_NUM_THREADS`` each).
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
from usf_bios.engine.jobdir import locked_spec
from usf_bios.engine.threads import available_cores
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


def engine_command(job_id: str, world_size: int) -> list[str]:
    """The engine's command line: one process, or torchrun with one rank per GPU (or CPU rank) of the job."""
    engine = ["-m", "usf_bios.engine.run", job_id]
    if world_size == 1:
        return [sys.executable, *engine]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
            "--max-restarts=0", *engine]


def job_world_size(job_id: str, layout: StorageLayout) -> int:
    """The ranks the job's locked spec asks for (one when it cannot be read: the engine then says why it fails)."""
    try:
        return locked_spec(job_id, layout).gpu_config.world_size
    except (OSError, ValueError):   # ResumeRefused and SpecError are ValueErrors
        return 1


def rank_threads(settings: Settings, world_size: int, on_gpus: bool, cores: int) -> int | None:
    """OMP_NUM_THREADS of each rank of a job on several ranks (None: one rank, the engine chooses): the job's cores
    (all of them on GPUs; its CPU slot's share, cores // USF_MAX_CPU_JOBS, on the CPU) split over its ranks, unless
    OMP_NUM_THREADS or USF_CPU_THREADS_PER_JOB says otherwise."""
    if world_size == 1 or os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    if settings.cpu_threads_per_job is not None and not on_gpus:
        return settings.cpu_threads_per_job
    share = cores if on_gpus else cores // max(settings.max_cpu_jobs, 1)
    return max(1, share // world_size)


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
        self._launchers: set[int] = set()      # pids of the torchrun processes this process started
        self._stopping: set[int] = set()      # pids sent SIGTERM by this process
        self._gpu_count: int | None = None

    def resources(self) -> Resources:
        if self._gpu_count is None:
            self._gpu_count = len(list_gpus())
        return Resources(gpus=self._gpu_count, cpu_slots=self.settings.max_cpu_jobs)

    def start(self, job_id: str, gpu_ids: list[int]) -> str:
        out = self.layout.logs / f"{job_id}.out"
        out.parent.mkdir(parents=True, exist_ok=True)
        world_size = job_world_size(job_id, self.layout)
        env = engine_environment(self.settings, gpu_ids)
        threads = rank_threads(self.settings, world_size, bool(gpu_ids), available_cores())
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        with out.open("ab") as handle:
            proc = subprocess.Popen(engine_command(job_id, world_size), stdout=handle, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, env=env, cwd=self.layout.root)
        self._children[proc.pid] = proc
        if world_size > 1:
            self._launchers.add(proc.pid)
        return str(ProcessRef(proc.pid, process_start_time(proc.pid) or ""))

    def poll(self, handle: str | None, cursor: int, job_id: str) -> Progress:
        events, cursor = read_events(self.layout.job_events(job_id), cursor)
        ref = ProcessRef.parse(handle) if handle else None
        alive = ref is not None and self._is_alive(ref)
        exit_code, why = None, None
        if ref is not None and not alive and ref.pid in self._children:
            exit_code = self._children[ref.pid].poll()
            if ref.pid in self._launchers:
                why = (f"torchrun ended (exit status {exit_code}) without the job's verdict: a rank of the job was "
                       "lost; the job log says which")
        return Progress(events=events, cursor=cursor, alive=alive, exit_code=exit_code, lost_reason=why)

    def cancel(self, handle: str, kill: bool) -> None:
        """SIGTERM once (the engine checkpoints and ends as cancelled), SIGKILL when ``kill``; to the process group,
        and only while the process is still the job's (torchrun's: it passes the SIGTERM on to every rank, and its
        ranks die with it on a SIGKILL)."""
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
            self._launchers.discard(ref.pid)
            self._stopping.discard(ref.pid)

    def _is_alive(self, ref: ProcessRef) -> bool:
        child = self._children.get(ref.pid)
        if child is not None:
            return child.poll() is None
        return ref.start_time != "" and process_start_time(ref.pid) == ref.start_time
