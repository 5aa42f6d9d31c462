"""How many threads a CPU job's PyTorch computes with: its share of the cores when CPU jobs run side by side.

PyTorch starts one compute thread per physical core in every process. Two CPU jobs on one host then run twice
as many busy threads as there are cores, and each thread's spin-waits steal the other job's time: on a 2-core
machine two SmolLM2 jobs ran at 21–92 s a step each against ~4 s for one alone. A CPU job (``num_gpus: 0``)
therefore takes ``cores // USF_MAX_CPU_JOBS`` threads (at least one), where the cores are those this process
may run on (``os.sched_getaffinity``), unless the user chose: ``USF_CPU_THREADS_PER_JOB`` is taken as given,
and an ``OMP_NUM_THREADS`` in the environment leaves PyTorch as that made it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from usf_bios.settings import Settings
from usf_bios.spec import JobSpec


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or ``taskset``'s limit included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_threads_for_job(available_cores: int, max_cpu_jobs: int, environ: Mapping[str, str],
                        per_job: int | None = None) -> int | None:
    """Threads for one CPU job, or None to leave PyTorch's own choice.

    ``per_job`` (USF_CPU_THREADS_PER_JOB) wins; then an ``OMP_NUM_THREADS`` the user set; with at most one CPU job
    at a time PyTorch's default stands (one thread per physical core); else this job's share of the cores.
    """
    if per_job is not None:
        return per_job
    if environ.get("OMP_NUM_THREADS", "").strip():
        return None
    if max_cpu_jobs <= 1:
        return None
    return max(1, available_cores // max_cpu_jobs)


def use_cpu_share(spec: JobSpec, settings: Settings, log: Callable[[str], None]) -> int:
    """Set PyTorch's thread count for a CPU job (GPU jobs are left alone), log it, and return it.

    Call it before the job's first computation. A share is never raised above PyTorch's default (which counts
    physical cores, where the affinity counts hyperthreads too); USF_CPU_THREADS_PER_JOB is set as given.
    """
    import torch

    if spec.gpu_config.num_gpus != 0:
        return torch.get_num_threads()
    cores = available_cores()
    wanted = cpu_threads_for_job(cores, settings.max_cpu_jobs, os.environ, settings.cpu_threads_per_job)
    if settings.cpu_threads_per_job is not None:
        why = "USF_CPU_THREADS_PER_JOB"
    elif wanted is None:
        why = "OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS", "").strip() else "PyTorch's default"
    else:
        why = f"{cores} cores shared by up to USF_MAX_CPU_JOBS={settings.max_cpu_jobs} CPU jobs"
    if wanted is not None and (settings.cpu_threads_per_job is not None or wanted < torch.get_num_threads()):
        torch.set_num_threads(wanted)
    threads = torch.get_num_threads()
    log(f"CPU threads: {threads} ({why})")
    return threads
