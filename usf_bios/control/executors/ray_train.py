"""The driver of a Ray job of several ranks: ``python -m usf_bios.control.executors.ray_train JOB_ID``, the
entrypoint the ray executor submits for a job with ``gpu_config.world_size`` > 1 (or ``num_nodes`` > 1). It runs
on the cluster, not in the server.

Ray Train's ``TorchTrainer`` places the ranks: ``ScalingConfig(num_workers=world_size, use_gpu=num_gpus > 0,
resources_per_worker={CPU: 1, GPU: 1 (on GPUs), USF_RAY_RESOURCES…})``, spread over ``num_nodes`` hosts. Each
Ray Train worker runs the engine as its own process (``python -m usf_bios.engine.run JOB_ID``) with the torchrun
environment — RANK, WORLD_SIZE, LOCAL_RANK, and MASTER_ADDR/MASTER_PORT of a fresh rendezvous on rank 0's node,
told to the other ranks through the process group Ray Train set up — so the engine trains exactly as under
torchrun (engine/distributed.py): DDP, NCCL on GPUs and gloo on the CPU, rank 0 writing the job's files. The
engine is a process of its own so that SIGTERM reaches it (a Ray Train worker runs its function in a thread).

Stopping: Ray sends this driver SIGTERM when the job is stopped; the driver leaves a stop file in the job's log
folder, each worker sees it and sends its engine SIGTERM, the ranks agree to stop at the same step and rank 0
checkpoints. A worker lost with its node makes ``fit`` fail: the driver then exits with LOST_EXIT, which the
executor reads as "interrupted" (and the job is resumed from its checkpoint), not as the engine's failure.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from usf_bios.control.executors.ray import LOST_EXIT
from usf_bios.engine.jobdir import locked_spec
from usf_bios.settings import get_settings
from usf_bios.storage import StorageLayout

PR_SET_PDEATHSIG = 1
try:   # resolved here, not in the forked child: a Ray worker has many threads, the child only calls it
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):   # not Linux
    _prctl = None


def stop_file(layout: StorageLayout, job_id: str) -> Path:
    return layout.logs / f"{job_id}.ray-stop"


def _die_with_parent() -> None:
    """In the engine process before exec: SIGKILL when the Ray worker's thread that started it ends (Linux's
    PR_SET_PDEATHSIG), so no engine outlives its Ray Train worker."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def run_rank(config: dict[str, Any]) -> None:
    """One rank, inside a Ray Train worker: the engine process with the torchrun environment, stopped with
    SIGTERM when the stop file appears. The engine's own events say how the job ended."""
    import ray.train
    import torch.distributed as dist

    job_id = config["job_id"]
    context = ray.train.get_context()
    rank, size = context.get_world_rank(), context.get_world_size()
    # the engine's own rendezvous: rank 0's host (as Ray Train found it) and a port free there now
    rendezvous = [os.environ.get("MASTER_ADDR", "127.0.0.1"), _free_port() if rank == 0 else 0]
    dist.broadcast_object_list(rendezvous, src=0)
    env = {**os.environ, "MASTER_ADDR": str(rendezvous[0]), "MASTER_PORT": str(rendezvous[1]), "RANK": str(rank),
           "WORLD_SIZE": str(size), "LOCAL_RANK": str(context.get_local_rank()),
           "LOCAL_WORLD_SIZE": str(context.get_local_world_size()), "GROUP_RANK": str(context.get_node_rank())}
    layout = StorageLayout.from_settings(get_settings())
    out = layout.logs / (f"{job_id}.out" if rank == 0 else f"{job_id}.rank{rank}.out")
    stop, stopping = stop_file(layout, job_id), False
    with out.open("ab") as handle:
        engine = subprocess.Popen([sys.executable, "-m", "usf_bios.engine.run", job_id], env=env, stdout=handle,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        while engine.poll() is None:
            if not stopping and stop.exists():
                engine.send_signal(signal.SIGTERM)
                stopping = True
            time.sleep(0.5)


def scaling(spec: Any, resources: dict[str, float]) -> dict[str, Any]:
    """ScalingConfig's arguments for the job: a worker per rank, each with a CPU, its GPU and the extra resources;
    ranks spread over num_nodes hosts (one rank per host when they are equal)."""
    gpu = spec.gpu_config
    per_worker = {"CPU": 1.0, **({"GPU": 1.0} if gpu.num_gpus else {}), **resources}
    if gpu.num_nodes == 1:
        strategy = "PACK"
    else:
        strategy = "STRICT_SPREAD" if gpu.num_nodes == gpu.world_size else "SPREAD"
    return {"num_workers": gpu.world_size, "use_gpu": gpu.num_gpus > 0, "resources_per_worker": per_worker,
            "placement_strategy": strategy}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: python -m {__spec__.name if __spec__ else 'ray_train'} JOB_ID", file=sys.stderr)
        return 2
    job_id = args[0]
    settings = get_settings()
    layout = StorageLayout.from_settings(settings)
    spec = locked_spec(job_id, layout)
    stop = stop_file(layout, job_id)
    stop.unlink(missing_ok=True)   # a stop asked of an earlier attempt
    signal.signal(signal.SIGTERM, lambda *_: stop.touch())

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # this module by its name, not __main__: the workers import it, rather than get run_rank (and its globals) pickled
    from usf_bios.control.executors.ray_train import run_rank as rank

    ray.init(log_to_driver=False)
    trainer = TorchTrainer(
        rank, train_loop_config={"job_id": job_id},
        scaling_config=ScalingConfig(**scaling(spec, dict(settings.ray_resources))),
        # Ray Train's process group only tells the ranks the engine's rendezvous: gloo, also on GPUs
        torch_config=TorchConfig(backend="gloo", timeout_s=int(settings.dist_timeout_s)),
        run_config=RunConfig(name=job_id, storage_path=str(layout.root / "data" / "ray"),
                             failure_config=FailureConfig(max_failures=0)))
    started = time.monotonic()
    try:
        trainer.fit()
    except Exception as err:  # noqa: BLE001  a worker (its node) went away: the job is interrupted, not failed
        print(f"a worker of job {job_id} was lost after {time.monotonic() - started:.0f} s: "
              f"{type(err).__name__}: {err}", file=sys.stderr)
        return LOST_EXIT
    finally:
        stop.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
