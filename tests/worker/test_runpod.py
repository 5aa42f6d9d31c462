"""The RunPod serverless handler, run by RunPod's own SDK in its local modes (no RunPod account here): as a local
endpoint (``--rp_serve_api``) that the control plane's remote executor drives through /run and /status — the
job trains in the handler, its events come back in the output, its artifact through the signed upload URL — and
once with ``--test_input``, where input the contract refuses ends the run with the field at fault."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from tests.api.conftest import Server, free_port, kill_engines
from tests.api.flows import final, submit, wait_for
from tests.worker.conftest import CALLBACK_SECRET, clean_env, prepare
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
