"""The RunPod serverless handler, run by RunPod's own SDK in its local modes (no RunPod account here): as a local
endpoint (``--rp_serve_api``) that the control plane's remote executor drives through /run and /status — the
job trains in the handler, its events come back in the output, its artifact through the signed upload URL — and
once with ``--test_input``, where input the contract refuses ends the run with the field at fault."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.api.conftest import Server, free_port, kill_engines
from tests.api.flows import final, submit, wait_for
from tests.worker.conftest import CALLBACK_SECRET, Files, clean_env, prepare
from tests.worker.test_contract import payload
from tests.worker.test_remote_jobs import check_finished, load_with_peft, remote_spec

pytest.importorskip("runpod")


def handler_env(home, **extra: str) -> dict[str, str]:
    env = clean_env(home)
    env.update({"USF_CALLBACK_SECRET": CALLBACK_SECRET, "USF_WORKER_ALLOWED_HOSTS": "127.0.0.1",
                "USF_CALLBACK_INTERVAL_S": "0.5", "RUNPOD_DEBUG_LEVEL": "INFO", **extra})
    return env


def test_the_control_plane_runs_a_job_on_a_runpod_endpoint(tmp_path, tiny_template):
    from tests.api.flows import tiny_model_in

    rp_home = tmp_path / "runpod"
    rp_home.mkdir()
    volume_models = tmp_path / "runpod-volume"   # the template's MODEL_PATH: the network volume's model folder
    tiny_model_in(volume_models, tiny_template)
    port = free_port()
    log = (rp_home / "handler.log").open("ab")
    handler = subprocess.Popen([sys.executable, "-m", "usf_bios.worker.runpod_handler", "--rp_serve_api",
                                "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)],
                               env=handler_env(rp_home, MODEL_PATH=str(volume_models / "models")), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    control = None
    try:
        deadline = time.monotonic() + 60
        while True:
            assert handler.poll() is None, (rp_home / "handler.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the SDK's local endpoint did not come up"
            time.sleep(0.2)
        home = tmp_path / "control"
        home.mkdir()
        env = clean_env(home)
        control = Server(home=home, env=env)
        env.update({"DATABASE_URL": f"sqlite:///{home / 'data' / 'usf.db'}",
                    "GPU_CLUSTER_API_URL": f"http://127.0.0.1:{port}", "GPU_CLUSTER_API_KEY": "runpod-api-key",
                    "USF_REMOTE_API": "runpod", "USF_CALLBACK_SECRET": CALLBACK_SECRET, "USF_EXECUTOR": "remote",
                    "USF_PUBLIC_URL": control.url, "USF_REMOTE_POLL_S": "1"})
        control.start()
        model, dataset = prepare(control, tmp_path, tiny_template)
        with control.client() as client:
            job = submit(client, remote_spec(model, dataset))
            done = wait_for(client, job["id"], final, timeout=400)
        check_finished(control, done)
        load_with_peft(control, done["id"])
        assert "RunPod endpoint" in control.home.joinpath("server.log").read_text()
        assert not list((control.home / "data" / "output").glob("*.uploaded.tar"))   # unpacked, then gone
    finally:
        if control is not None:
            control.stop()
        handler.kill()
        kill_engines(rp_home)


def test_the_handler_refuses_bad_input_through_the_sdk_test_input(tmp_path):
    bad = {"input": {"job_id": "x", "dataset_url": "http://127.0.0.1:9/x.jsonl",
                     "hyperparameters": {"base_model": "test--tiny", "lora_r": 0}}}
    result = subprocess.run([sys.executable, "-m", "usf_bios.worker.runpod_handler", "--test_input", json.dumps(bad)],
                            env=handler_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "hyperparameters.lora_r" in result.stdout + result.stderr


class RunPodStatus(http.server.BaseHTTPRequestHandler):
    """Plays RunPod's hosted /status/{id} (no RunPod account here): answers with the job state it is given."""

    state: dict = {}

    def do_GET(self) -> None:  # noqa: N802
        body = json.dumps(self.state).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_progress_windows_overlap_and_the_output_holds_every_event(tmp_path, tiny_template, files, monkeypatch):
    """The handler itself, in this process, with a page of 5 events: its progress updates overlap, so a poller that
    misses two in a row still mirrors every step's point, and its output holds every event up to ``done`` (not
    one page). A RunPod output cut short (no ``done``) still completes the job once its artifact is here."""
    import shutil

    from tests.api.flows import tiny_model_in
    from tests.conftest import chat_rows, write_jsonl
    from usf_bios.control.executors.remote import RemoteExecutor
    from usf_bios.control.executors.transports import uploaded_artifact
    from usf_bios.settings import Settings
    from usf_bios.storage import StorageLayout
    from usf_bios.worker import runpod_handler, service
    from usf_bios.worker.contract import SequencedEvent

    home = tmp_path / "runpod"
    tiny_model_in(home, tiny_template)
    for key in list(os.environ):
        monkeypatch.delenv(key)
    for key, value in handler_env(home).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(service, "MAX_EVENTS_PAGE", 5)
    monkeypatch.setattr(runpod_handler, "PROGRESS_INTERVAL_S", 0.0)
    monkeypatch.setattr(runpod_handler, "WATCH_S", 0.02)
    monkeypatch.setattr(runpod_handler, "_running", {})
    updates: list[dict] = []
    monkeypatch.setattr(runpod_handler, "_progress", lambda job, update: updates.append(update))
    Files.files["/chat.jsonl"] = write_jsonl(tmp_path / "chat.jsonl", chat_rows(20)).read_bytes()
    try:
        output = runpod_handler.handler({"id": "rp-1", "input": payload("rp-job", files + "/chat.jsonl", max_steps=40,
                                                                        eval_steps=20, save_steps=20)})
        worker = runpod_handler._running["service"]
        artifact = worker.artifact_path(output["status"]["external_job_id"])
    finally:
        if "service" in runpod_handler._running:
            runpod_handler._running["sender"].stop()
            runpod_handler._running["service"].stop()
        kill_engines(home)
    assert output["status"]["status"] == "completed", output.get("error")
    types = [e["event"]["type"] for e in output["events"]]
    assert types[-1] == "done" and types.count("metric") == 40, types

    control = tmp_path / "control"
    settings = Settings(USF_HOME=str(control), GPU_CLUSTER_API_URL="http://127.0.0.1:9", GPU_CLUSTER_API_KEY="k",
                        USF_REMOTE_API="runpod", USF_PUBLIC_URL="http://127.0.0.1:9")
    layout = StorageLayout.from_settings(settings)
    layout.ensure()
    executor = RemoteExecutor(layout, settings)
    with_points = [u for u in updates if any(e["event"]["type"] == "metric" for e in u["events"])]
    assert len(with_points) >= 6, len(with_points)
    seen = updates[::3] + [updates[-1]]          # the poller misses two updates of every three
    job = executor._job("polled")
    for update in seen:
        executor._take("polled", job, [SequencedEvent.model_validate(e) for e in update["events"]], update["after"])
    last = max(e["event"]["step"] for u in seen for e in u["events"] if e["event"]["type"] == "metric")
    mirrored = [json.loads(line) for line in layout.job_events("polled").read_text().splitlines()]
    assert [e["step"] for e in mirrored if e["type"] == "metric"] == list(range(1, last + 1))

    # a completed RunPod job whose output holds only its first page: the artifact completes it
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RunPodStatus)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        RunPodStatus.state = {"id": "rp-1", "status": "COMPLETED", "output": {**output, "events": output["events"][:5]}}
        executor.transport.client.base_url = f"http://127.0.0.1:{server.server_address[1]}"
        shutil.copy(artifact, uploaded_artifact(layout.output, "cut-short"))
        executor._job("cut-short").external_id = "rp-1"
        progress = executor.poll("cut-short", 0, "cut-short")
    finally:
        server.shutdown()
    assert not progress.alive and progress.events[-1].type == "done" and progress.events[-1].status == "completed"
    assert (layout.job_output("cut-short") / "adapter_model.safetensors").is_file()
