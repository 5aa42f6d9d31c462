"""The ray executor on a real Ray cluster of this host (tests/control/raycluster.py: a head with the dashboard and
a worker node, CPU resources only), behind real `usf-bios serve`s with USF_EXECUTOR=ray whose USF_HOME every node
sees (the "shared volume"): a job submitted through REST runs as a Ray job and completes with every step's point;
a job of two CPU ranks runs through Ray Train's TorchTrainer with two workers and its per-step losses are those of
one process with the same global batch; a cancelled job checkpoints and its Ray job is stopped; the node a job
runs on is killed mid-job, and the job is interrupted, resumed from its checkpoint on the node that replaces it
(the server restarted meanwhile) and completes; a rank's failed done is held back until Ray says a worker was
lost. /system shows the nodes.

Bounded: every wait has a timeout; the cluster is stopped by killing its own processes only."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import Server, kill_engines
from tests.api.test_distributed_jobs import job_processes
from tests.api.flows import final, job_spec, register_model, submit, tiny_model_in, upload_dataset, wait_for
from tests.conftest import chat_rows, event_dicts, write_jsonl
from tests.control.raycluster import RayCluster, make_cluster
from tests.worker.conftest import clean_env

pytest.importorskip("ray.train.torch")
pytestmark = pytest.mark.slow   # a two-node Ray cluster and six Ray jobs: 2.5-3.5 minutes on 2 shared cores

STEPS = 5
WORKER = "usf_test_worker"   # the custom resource of the worker node(s): a job asking for it runs there


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    """Started, not yet waited for: the server starts meanwhile (``server``)."""
    cluster = make_cluster()
    try:
        cluster.start_head(cpus=2)
        cluster.add_worker(cpus=2, resources=json.dumps({WORKER: 1}), wait=False)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def homes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    homes = {name: tmp_path_factory.mktemp(f"ray-{name}") / "usf" for name in ("main", "placed")}
    for home in homes.values():
        home.mkdir()
    yield homes
    for home in homes.values():
        kill_engines(home)


PLACED = {"USF_RAY_RESOURCES": json.dumps({WORKER: 1}), "USF_MAX_ATTEMPTS": "3"}   # jobs on the worker node


def control(home: Path, cluster: RayCluster, start: bool = True, **extra: str) -> Server:
    env = clean_env(home)
    env.update({"DATABASE_URL": f"sqlite:///{home / 'data' / 'usf.db'}", "USF_EXECUTOR": "ray",
                "RAY_ADDRESS": cluster.address, "USF_DIST_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1", **extra})
    server = Server(home=home, env=env)
    return server.start() if start else server


@pytest.fixture(scope="module")
def servers(homes: dict[str, Path], cluster: RayCluster) -> Iterator[dict[str, Server]]:
    """Two servers, each on its own storage root, started together while the cluster boots: ``main``, and
    ``placed``, whose jobs ask for the worker node's custom resource (USF_RAY_RESOURCES)."""
    servers = {"main": control(homes["main"], cluster, start=False),
               "placed": control(homes["placed"], cluster, start=False, **PLACED)}
    starts = [threading.Thread(target=server.start) for server in servers.values()]
    for thread in starts:
        thread.start()
    for thread in starts:
        thread.join(timeout=120)
    for server in servers.values():
        assert httpx.get(server.url + server.health_path, timeout=5).status_code == 200, server.log()[-3000:]
    cluster.wait_ready(nodes=2)
    yield servers
    for server in servers.values():
        server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def server(servers: dict[str, Server]) -> Server:
    return servers["main"]


def prepare(server: Server, folder: Path) -> tuple[str, str]:
    """The tiny model registered and a chat dataset uploaded: (model name, dataset id)."""
    with server.client() as client:
        register_model(client, "test--tiny", tiny_model_in(server.home))
        return "test--tiny", upload_dataset(client, write_jsonl(folder / "chat.jsonl", chat_rows(40)))["id"]


@pytest.fixture(scope="module")
def prepared(server: Server, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return prepare(server, tmp_path_factory.mktemp("ray-data"))


def spec(model: str, dataset: str, name: str, accumulation: int, ranks: int = 1, **hp) -> dict:
    hp = {"max_steps": STEPS, "eval_steps": 2, "save_steps": 2, **hp}
    body = job_spec(model, dataset, name=name, batch_size=2, gradient_accumulation_steps=accumulation,
                    max_seq_length=96, lora_r=4, lora_alpha=8, lora_dropout=0.0, **hp)
    if ranks > 1:
        body["gpu_config"]["num_processes"] = ranks
    return body


@pytest.fixture(scope="module")
def jobs(server: Server, prepared: tuple[str, str]) -> dict[str, dict]:
    """Submitted together (the cluster has a CPU for each rank): a job of one rank (4 micro-batches a step), one of
    two ranks (2 each), and a long one that is cancelled once it trains."""
    model, dataset = prepared
    with server.client() as client:
        single = submit(client, spec(model, dataset, "ray-single", accumulation=4))
        double = submit(client, spec(model, dataset, "ray-double", accumulation=2, ranks=2))
        cancel = submit(client, spec(model, dataset, "ray-cancel", accumulation=1, max_steps=100_000, save_steps=100_000))
        wait_for(client, cancel["id"], lambda j: j["current_step"] >= 2 or final(j), timeout=240)
        assert client.post(f"/jobs/{cancel['id']}/cancel").status_code == 200
        return {name: wait_for(client, job["id"], final, timeout=240)
                for name, job in (("single", single), ("double", double), ("cancel", cancel))}


@pytest.fixture(scope="module")
def pair(jobs: dict[str, dict]) -> tuple[dict, dict]:
    return jobs["single"], jobs["double"]


def losses(home: Path, job_id: str) -> list[float]:
    return [e["loss"] for e in event_dicts(home / "data" / "logs" / f"{job_id}.events.jsonl") if e["type"] == "metric"]


def ray_jobs(cluster: RayCluster, job_id: str, timeout: float = 60) -> list:
    """The Ray jobs that ran ``job_id``, oldest first, once they have ended (a driver may still be shutting Ray
    Train down when the engine's done event has arrived)."""
    from ray.job_submission import JobSubmissionClient

    client, deadline = JobSubmissionClient(cluster.dashboard), time.monotonic() + timeout
    while True:
        found = [j for j in client.list_jobs() if (j.metadata or {}).get("usf_job_id") == job_id]
        if all(j.status.is_terminal() for j in found) or time.monotonic() > deadline:
            return sorted(found, key=lambda j: j.start_time or 0)
        time.sleep(0.5)


def test_a_job_submitted_through_rest_runs_on_the_cluster_and_completes(server, cluster, pair):
    single, _ = pair
    assert single["status"] == "completed" and single["executor"] == "ray", single
    with server.client() as client:
        points = client.get(f"/jobs/{single['id']}/metrics").json()
        place = client.get(f"/jobs/{single['id']}/placement").json()
        system = client.get("/system").json()
    assert [p["step"] for p in points] == list(range(1, STEPS + 1)) and all(p["loss"] is not None for p in points)
    assert (server.home / "data" / "output" / single["id"] / "adapter_model.safetensors").is_file()
    [ran] = ray_jobs(cluster, single["id"])
    assert ran.status == "SUCCEEDED" and ran.entrypoint == f"python -m usf_bios.engine.run {single['id']}"
    assert place == {"executor": "ray", "where": f"Ray cluster {cluster.address}", "remote_status": None,
                     "remote_stage": None, "remote_job_id": None}
    ray = system["ray"]
    assert ray["reachable"] and ray["address"] == cluster.address and len(ray["nodes"]) == 2, ray
    assert [n["head"] for n in ray["nodes"]] == [True, False] and ray["gpus"] == 0
    assert sorted(n["cpus"] for n in ray["nodes"]) == [2, 2]
    page = httpx.get(server.url + "/ui/system", timeout=30)
    assert page.status_code == 200 and 'id="ray-nodes"' in page.text and "0 of 0 GPUs free" in page.text


def test_two_ranks_through_torchtrainer_give_the_losses_of_one_process(server, cluster, pair):
    single, double = pair
    assert double["status"] == "completed", double
    one, two = losses(server.home, single["id"]), losses(server.home, double["id"])
    assert len(one) == len(two) == STEPS
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (one, two)
    [ran] = ray_jobs(cluster, double["id"], timeout=0)   # its driver may still be shutting Ray Train down
    assert ran.status in ("RUNNING", "SUCCEEDED") and "usf_bios.control.executors.ray_train" in ran.entrypoint
    logs = server.home / "data" / "logs"
    assert "rank 0 of 2 (DistributedDataParallel, gloo)" in (logs / f"{double['id']}.log").read_text()
    assert (logs / f"{double['id']}.rank1.log").is_file()
    assert (server.home / "data" / "ray" / double["id"]).is_dir(), "Ray Train's run folder on the shared storage"


def test_cancel_stops_the_ray_job_after_the_engine_saved_a_checkpoint(server, cluster, jobs):
    cancelled = jobs["cancel"]
    assert cancelled["status"] == "cancelled", cancelled
    events = event_dicts(server.home / "data" / "logs" / f"{cancelled['id']}.events.jsonl")
    assert [e["status"] for e in events if e["type"] == "done"] == ["cancelled"]
    assert any(e["type"] == "checkpoint" for e in events), "SIGTERM from Ray: the engine checkpoints first"
    [ran] = ray_jobs(cluster, cancelled["id"])
    assert ran.status == "STOPPED"


def test_a_failed_rank_of_a_lost_node_is_held_back_until_ray_says_how_the_job_ended(server, cluster, prepared,
                                                                                     tmp_path):
    """A job of two ranks whose node went away: a surviving rank may write a failed done event (its peer is
    gone) before the driver reports the lost worker (exit LOST_EXIT). The executor passes the events before it on
    at once, holds the failed one back while the Ray job runs, and then reports the job lost, not failed. (The
    Ray job here is a stand-in driver: it writes what such a rank writes and exits as the driver does.)"""
    from ray.job_submission import JobSubmissionClient

    from usf_bios.control.executors.ray import LOST_EXIT, RayExecutor
    from usf_bios.engine.jobdir import create_job
    from usf_bios.settings import Settings
    from usf_bios.spec import JobSpec
    from usf_bios.storage import StorageLayout

    model, dataset = prepared
    settings = Settings(usf_home=server.home, ray_address=cluster.address)
    layout = StorageLayout.from_settings(settings)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(4))
    body = spec(str(server.home / "models" / model), str(data), "ray-held", accumulation=1, ranks=2)
    job_id = create_job(JobSpec.model_validate(body), layout)
    events = layout.job_events(job_id)
    stand_in = (f"import time; from pathlib import Path; from usf_bios.engine.events import EventLog; "
                f"from usf_bios.status import JobStatus; "
                f"log = EventLog(Path({str(events)!r}), Path({str(layout.job_log(job_id))!r})); log.stage('training'); "
                f"log.done(JobStatus.FAILED, error='Connection reset by peer'); log.close(); time.sleep(1.5); "
                f"raise SystemExit({LOST_EXIT})")
    handle = JobSubmissionClient(cluster.dashboard).submit_job(entrypoint=f'python -c "{stand_in}"',
                                                               metadata={"usf_job_id": job_id})
    executor, seen, cursor = RayExecutor(layout, settings), [], 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        progress = executor.poll(handle, cursor, job_id)
        seen += progress.events
        cursor = progress.cursor
        if not progress.alive:
            break
        if any(e.type == "stage" for e in seen):
            assert all(e.type != "done" for e in seen) and cursor < events.stat().st_size, "held back while it runs"
        time.sleep(0.3)
    assert not progress.alive and [e.type for e in seen] == ["stage"], seen
    assert progress.exit_code == LOST_EXIT and "a worker of the job was lost" in (progress.lost_reason or "")
    assert cursor == events.stat().st_size


def test_a_lost_node_interrupts_the_job_which_resumes_from_its_checkpoint(servers, cluster, tmp_path):
    """The job is placed on the worker node (USF_RAY_RESOURCES asks for its custom resource); that node is killed
    after the first checkpoint, its engine with it (Ray's raylet dies at once, the processes it started only once
    they notice); a node with the same resource joins (as an autoscaler replaces it). The server is
    restarted during the second attempt and follows it to the end."""
    again = servers["placed"]
    home = again.home
    try:
        model, dataset = prepare(again, tmp_path)
        steps = 24
        with again.client() as client:
            job = submit(client, spec(model, dataset, "ray-lost", accumulation=1, max_steps=steps, save_steps=4,
                                      eval_steps=1000))
            running = wait_for(client, job["id"], lambda j: j["current_step"] >= 5 or final(j), timeout=120)
            assert running["status"] == "running", running
            where = client.get(f"/jobs/{job['id']}/placement").json()["where"]
            assert where.startswith(f"Ray job usf-{job['id']}-") and f" on {cluster.address}" in where, where
            cluster.nodes[1].kill()
            for pids in job_processes(job["id"]).values():   # a lost machine takes its processes with it at once
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            lost_at = time.monotonic()
            cluster.add_worker(cpus=1, resources=json.dumps({WORKER: 1}), wait=False)   # the replacement, joining
            requeued = wait_for(client, job["id"], lambda j: j["attempts"] >= 2 or final(j), timeout=60)
            assert requeued["attempts"] == 2, requeued
            detected = time.monotonic() - lost_at
        # the server restarts while the second attempt waits for (or runs on) the new node: it follows it again
        again.stop()
        again = control(home, cluster, **PLACED)
        with again.client() as client:
            done = wait_for(client, job["id"], final, timeout=150)
            points = client.get(f"/jobs/{job['id']}/metrics").json()
    finally:
        again.stop(signal.SIGKILL)
    assert done["status"] == "completed" and done["attempts"] == 2, done
    assert [p["step"] for p in points] == list(range(1, steps + 1))
    log = (home / "data" / "logs" / f"{job['id']}.log").read_text()
    assert "resuming from checkpoint-" in log, log[-2000:]
    first, second = ray_jobs(cluster, job["id"])
    assert first.status == "FAILED" and second.status == "SUCCEEDED"
    assert detected < 45, f"the lost node was noticed after {detected:.0f} s"
    events = event_dicts(home / "data" / "logs" / f"{job['id']}.events.jsonl")
    assert [e["status"] for e in events if e["type"] == "done"] == ["completed"]
