"""Ray executor: every job is a Ray job on the cluster at RAY_ADDRESS, submitted through the Ray Jobs API.

A job of one rank is the engine itself as the Ray job's entrypoint (``python -m usf_bios.engine.run JOB_ID``,
with ``entrypoint_num_gpus`` its GPUs). A job of several ranks (``gpu_config.world_size`` > 1, or ``num_nodes``
> 1) has the driver ``usf_bios.control.executors.ray_train`` as its entrypoint, which runs Ray Train's
``TorchTrainer`` with ``ScalingConfig(num_workers=world_size, use_gpu, resources_per_worker)``: one engine
process per rank, where Ray placed it. Every node mounts the storage root at the same path (USF_HOME on a
shared volume), so the engine writes the job folder there and this server follows the same events file as it
does for a local job; the job's environment is this server's storage paths (the Ray job's ``runtime_env``).

Cancel stops the Ray job: Ray sends SIGTERM (the engine checkpoints and ends as cancelled), then SIGKILL after
USF_CANCEL_GRACE_S (the job's RAY_JOB_STOP_WAIT_TIME_S). A Ray job that ends without the engine's ``done`` event
— its node was lost, or a rank of a TorchTrainer job went with its node — is reported gone with Ray's reason:
the scheduler marks the job interrupted and submits it again (a new Ray job), which resumes from its newest
checkpoint, up to USF_MAX_ATTEMPTS. The handle of a job is its Ray submission id.

Ray is an optional dependency (``pip install 'usf-bios[ray]'``): this module imports it only when an executor is
made, and ``check_ray`` says in one line what is missing.
"""

from __future__ import annotations

import json
import logging
import secrets
import shlex
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from usf_bios.control.executors.base import Progress, Resources
from usf_bios.control.executors.local import storage_environment
from usf_bios.engine.events import DoneEvent, read_events_at
from usf_bios.engine.jobdir import locked_spec
from usf_bios.settings import Settings
from usf_bios.status import JobStatus
from usf_bios.storage import StorageLayout

log = logging.getLogger("usf_bios.ray")
POLL_S = 1.0                   # the Jobs API is asked about a job at most this often (its events come from the file)
LOST_EXIT = 75                 # the TorchTrainer driver's exit status when a worker (a rank's node) was lost
ALIVE = ("PENDING", "RUNNING")
DRIVER = "usf_bios.control.executors.ray_train"
RETRY_S = 10.0                 # after the cluster could not be reached, how long before it is asked again


class ExecutorUnavailable(RuntimeError):
    """The configured executor cannot run on this server (what is missing, in one line)."""


def check_ray() -> None:
    """Raise ExecutorUnavailable when Ray's Jobs API is not installed (the server needs only it; Ray Train is
    imported on the cluster, by the driver)."""
    try:
        import ray.job_submission  # noqa: F401
    except ImportError as err:
        raise ExecutorUnavailable(f"USF_EXECUTOR=ray needs Ray ({err}); install it with "
                                  "`pip install 'usf-bios[ray]'`") from None


@dataclass
class RayJob:
    """What this server knows of one Ray job: Ray's last answer, and what the job's spec says."""

    job_id: str
    ranks: int = 1
    ray_status: str | None = None     # PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED, as Ray last said
    message: str = ""
    error_type: str | None = None
    exit_code: int | None = None
    node: str | None = None           # the node (IP) the entrypoint runs on
    asked: float = 0.0
    answered: float = field(default_factory=time.monotonic)
    stop_sent: bool = False


class RayExecutor:
    name = "ray"

    def __init__(self, layout: StorageLayout, settings: Settings):
        check_ray()
        self.layout, self.settings = layout, settings
        self.address = settings.ray_address
        self._client: Any = None
        self._failed_at, self._failure = -RETRY_S, ""
        self._jobs: dict[str, RayJob] = {}
        self._lock = threading.Lock()

    # -- the interface ------------------------------------------------------------------------------
    def resources(self) -> Resources:
        # Ray places jobs on its nodes and keeps what does not fit pending (an autoscaler may add nodes)
        return Resources(gpus=1024, cpu_slots=1024)

    def start(self, job_id: str, gpu_ids: list[int]) -> str:
        spec = locked_spec(job_id, self.layout)
        gpu = spec.gpu_config
        ranks = gpu.world_size
        env = {**storage_environment(self.settings), "USF_DIST_TIMEOUT_S": f"{self.settings.dist_timeout_s:g}",
               # Ray's SIGTERM → SIGKILL wait when the job is stopped: the engine checkpoints in between
               "RAY_JOB_STOP_WAIT_TIME_S": str(max(1, round(self.settings.cancel_grace_s)))}
        if self.settings.cpu_threads_per_job:
            env["USF_CPU_THREADS_PER_JOB"] = str(self.settings.cpu_threads_per_job)
        if self.settings.ray_resources:
            env["USF_RAY_RESOURCES"] = json.dumps(self.settings.ray_resources)   # the driver's workers ask for them too
        submission = f"usf-{job_id}-{secrets.token_hex(3)}"
        options: dict[str, Any] = {"submission_id": submission, "runtime_env": {"env_vars": env},
                                   "metadata": {"usf_job_id": job_id}}
        if ranks == 1 and gpu.num_nodes == 1:
            entrypoint = f"python -m usf_bios.engine.run {shlex.quote(job_id)}"
            options.update(entrypoint_num_cpus=1, entrypoint_num_gpus=gpu.num_gpus,
                           entrypoint_resources=dict(self.settings.ray_resources) or None)
        else:   # the driver asks for nothing: its workers hold the job's resources
            entrypoint = f"python -m {DRIVER} {shlex.quote(job_id)}"
            options.update(entrypoint_num_cpus=0)
        try:
            self.client().submit_job(entrypoint=entrypoint, **options)
        except (OSError, RuntimeError, ValueError) as err:
            raise OSError(f"the Ray cluster at {self.where()} did not take the job: {err}") from None
        with self._lock:
            self._jobs[submission] = RayJob(job_id, ranks=ranks, ray_status="PENDING")
        log.info("job %s submitted to the Ray cluster at %s as %s (%d rank%s)", job_id, self.where(), submission,
                 ranks, "s" if ranks > 1 else "")
        return submission

    def poll(self, handle: str | None, cursor: int, job_id: str) -> Progress:
        if handle is None:
            events, cursor = read_events_at(self.layout.job_events(job_id), cursor)
            return Progress(events=[e for _, e in events], cursor=cursor)
        job = self._job(handle, job_id)
        self._refresh(handle, job)          # Ray's word first, then the file: a done written before the end is read
        entries, end = read_events_at(self.layout.job_events(job_id), cursor)
        alive = job.ray_status in ALIVE or job.ray_status is None
        silent = time.monotonic() - job.answered
        if silent >= self.settings.remote_timeout_s:
            return Progress(events=[e for _, e in entries], cursor=end, alive=False,
                            lost_reason=f"the Ray cluster at {self.where()} did not answer for {silent:.0f} s")
        failed = next((i for i, (_, e) in enumerate(entries)
                       if isinstance(e, DoneEvent) and e.status == JobStatus.FAILED), None)
        if failed is not None and job.ranks > 1:
            # a rank that fails because another rank's node went away: Ray's outcome decides what it was
            if alive:
                before = entries[failed - 1][0] if failed else cursor
                return Progress(events=[e for _, e in entries[:failed]], cursor=before, alive=True)
            if self._lost(job):
                kept = [e for i, (_, e) in enumerate(entries) if i != failed]
                return Progress(events=kept, cursor=end, alive=False, exit_code=job.exit_code,
                                lost_reason=self._reason(handle, job))
        reason = None if alive else self._reason(handle, job)
        return Progress(events=[e for _, e in entries], cursor=end, alive=alive, exit_code=job.exit_code,
                        lost_reason=reason)

    def cancel(self, handle: str, kill: bool) -> None:
        """Stop the Ray job once: Ray sends SIGTERM, then SIGKILL after the job's RAY_JOB_STOP_WAIT_TIME_S (set
        from USF_CANCEL_GRACE_S), so a second call for ``kill`` has nothing left to add."""
        job = self._jobs.get(handle)
        if job is not None and job.stop_sent:
            return
        try:
            self.client().stop_job(handle)
        except (OSError, RuntimeError, ValueError) as err:
            log.warning("Ray job %s: stop not delivered (%s); trying again", handle, err)
            return
        if job is not None:
            job.stop_sent, job.asked = True, 0.0

    def describe(self, handle: str | None) -> str:
        if handle is None:
            return f"Ray cluster {self.where()}"
        job = self._jobs.get(handle)
        node = f", node {job.node}" if job and job.node else ""
        return f"Ray job {handle} on {self.where()}{node}"

    def forget(self, handle: str) -> None:
        with self._lock:
            self._jobs.pop(handle, None)

    # -- the cluster, for /system -------------------------------------------------------------------
    def cluster(self) -> dict[str, Any]:
        """The cluster's alive nodes with their CPUs and GPUs (total and free), from its dashboard."""
        base: dict[str, Any] = {"address": self.where(), "reachable": False, "nodes": [], "gpus": 0, "gpus_free": 0}
        try:
            from ray.util.state import list_nodes

            url = self.client().get_address()
            nodes = list_nodes(address=url, detail=True, raise_on_missing_output=False, timeout=5)
            usage = httpx.get(f"{url}/api/cluster_status", params={"format": "0"}, timeout=5).json()
        except Exception as err:  # noqa: BLE001  any failure to ask is shown as "unreachable", with what it was
            return {**base, "detail": f"no answer: {err or type(err).__name__}"}
        by_node = (((usage.get("data") or {}).get("clusterStatus") or {}).get("loadMetricsReport") or {}).get("usageByNode") or {}
        listed = []
        for node in nodes:
            if node.state != "ALIVE":
                continue
            used = by_node.get(node.node_id, {})
            total = node.resources_total or {}

            def free(name: str) -> float:
                pair = used.get(name)
                return float(pair[1] - pair[0]) if pair else float(total.get(name, 0))

            listed.append({"node_id": node.node_id, "ip": node.node_ip, "head": bool(node.is_head_node),
                           "cpus": float(total.get("CPU", 0)), "cpus_free": free("CPU"),
                           "gpus": float(total.get("GPU", 0)), "gpus_free": free("GPU")})
        listed.sort(key=lambda n: (not n["head"], n["ip"], n["node_id"]))
        dead = sum(1 for node in nodes if node.state != "ALIVE")
        return {**base, "reachable": True, "nodes": listed, "gpus": sum(n["gpus"] for n in listed),
                "gpus_free": sum(n["gpus_free"] for n in listed),
                "detail": f"{len(listed)} node(s) alive" + (f", {dead} gone" if dead else "")}

    # -- inside -------------------------------------------------------------------------------------
    def where(self) -> str:
        return self.address or "a local Ray cluster (RAY_ADDRESS unset)"

    def client(self) -> Any:
        """The Jobs API client, made on first use: making it asks the cluster for its dashboard's address, which
        for a GCS address (host:6379) of a cluster that is down blocks for Ray's GCS timeout (about 40 s), so after
        a failure it is not tried again for RETRY_S (OSError meanwhile, at once)."""
        if self._client is None:
            waited = time.monotonic() - self._failed_at
            if waited < RETRY_S:
                raise OSError(f"no answer {waited:.0f} s ago ({self._failure})")
            try:
                from ray.job_submission import JobSubmissionClient

                self._client = JobSubmissionClient(self.address)
            except Exception as err:  # noqa: BLE001  ConnectionError, or Ray's RpcError for a GCS that is down
                self._failed_at, self._failure = time.monotonic(), f"{type(err).__name__}: {err}"
                raise OSError(self._failure) from None
        return self._client

    def _job(self, handle: str, job_id: str) -> RayJob:
        with self._lock:
            job = self._jobs.get(handle)
            if job is None:   # after a restart of this server: the spec says how many ranks the job has
                try:
                    ranks = locked_spec(job_id, self.layout).gpu_config.world_size
                except (OSError, ValueError):
                    ranks = 1
                job = self._jobs[handle] = RayJob(job_id, ranks=ranks)
            return job

    def _refresh(self, handle: str, job: RayJob) -> None:
        if time.monotonic() - job.asked < POLL_S and job.ray_status is not None:
            return
        job.asked = time.monotonic()
        try:
            info = self.client().get_job_info(handle)
        except (OSError, RuntimeError, ValueError) as err:
            if "does not exist" in str(err):   # never known to Ray (its head was replaced): nothing runs it
                job.ray_status, job.message, job.answered = "FAILED", "the Ray cluster does not know this job", time.monotonic()
                return
            log.warning("Ray job %s: the cluster at %s did not answer (%s)", handle, self.where(), err)
            return
        job.answered = time.monotonic()
        job.ray_status = str(getattr(info.status, "value", info.status))
        job.message = info.message or ""
        job.error_type = str(getattr(info.error_type, "value", info.error_type)) if info.error_type else None
        job.exit_code = info.driver_exit_code
        if info.driver_agent_http_address:
            job.node = httpx.URL(info.driver_agent_http_address).host or None

    @staticmethod
    def _lost(job: RayJob) -> bool:
        """Whether the Ray job ended because something under it went away, not because the engine said so."""
        return job.exit_code == LOST_EXIT or (job.ray_status == "FAILED" and job.exit_code is None)

    def _reason(self, handle: str, job: RayJob) -> str:
        said = f": {job.message}" if job.message else ""
        if job.exit_code == LOST_EXIT:
            return f"Ray job {handle}: a worker of the job was lost{said}"
        return f"Ray job {handle} ended {job.ray_status or 'unknown'}{said}"
