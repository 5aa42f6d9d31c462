"""``report_to``: a job's metrics in TensorBoard event files (read back with TensorBoard's own reader) and in an
MLflow run (a local MLflow file store, read back with MLflow's client); a tool that cannot work fails the job
before the model loads, naming the fix."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import chat_rows, event_dicts, write_jsonl
from usf_bios.engine.jobdir import create_job
from usf_bios.engine.run import run_job
from usf_bios.spec import parse_spec


def _spec(model: str, dataset, report_to: list[str]) -> dict:
    return {"name": "reported", "base_model": model, "dataset": str(dataset), "gpu_config": {"num_gpus": 0},
            "report_to": report_to,
            "hyperparameters": {"max_steps": 6, "learning_rate": 1e-2, "batch_size": 4, "gradient_accumulation_steps": 1,
                                "max_seq_length": 128, "lora_r": 4, "lora_alpha": 8, "val_split": 0.2,
                                "eval_steps": 3, "save_steps": 3, "precision": "fp32"}}


def test_metrics_reach_tensorboard_and_mlflow(layout, tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "usf-test")
    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_rows(30))
    job_id = create_job(parse_spec(_spec(tiny_model, dataset, ["tensorboard", "mlflow"])), layout)
    result = run_job(job_id, layout)
    assert result.status == "completed", result.error
    events = event_dicts(layout.job_events(job_id))
    losses = {e["step"]: e["loss"] for e in events if e["type"] == "metric"}
    validation = {e["step"]: e["validation_loss"] for e in events if e["type"] == "eval"}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and sorted(validation) == [3, 6]

    board = EventAccumulator(str(layout.logs / f"{job_id}.tensorboard"))
    board.Reload()
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss"} <= set(board.Tags()["scalars"])
    assert {s.step: s.value for s in board.Scalars("train/loss")} == pytest.approx(losses, rel=1e-6)
    assert {s.step: s.value for s in board.Scalars("eval/loss")} == pytest.approx(validation, rel=1e-6)

    client = MlflowClient(tracking_uri=store)
    run_id = (layout.job_output(job_id) / ".mlflow_run_id").read_text()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == job_id
    assert client.get_experiment(run.info.experiment_id).name == "usf-test"
    assert run.data.params["learning_rate"] == "0.01" and run.data.params["lora_r"] == "4"
    assert {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")} == pytest.approx(losses)
    assert {m.step: m.value for m in client.get_metric_history(run_id, "eval/loss")} == pytest.approx(validation)
    log = layout.job_log(job_id).read_text()
    assert f"report_to mlflow: run {run_id}" in log and "report_to tensorboard:" in log


def test_a_tool_that_cannot_work_fails_the_job_before_the_model_loads(layout, tiny_model, tmp_path, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    cases = [("mlflow", "report_to: mlflow needs MLFLOW_TRACKING_URI")]
    if importlib.util.find_spec("wandb") is None:
        cases.append(("wandb", "report_to: wandb needs the wandb package: pip install 'usf-bios[wandb]'"))
    else:
        cases.append(("wandb", "report_to: wandb needs WANDB_API_KEY (or WANDB_MODE=offline)"))
    for tool, reason in cases:
        if tool == "mlflow" and importlib.util.find_spec("mlflow") is None:
            reason = "report_to: mlflow needs the mlflow package: pip install 'usf-bios[mlflow]'"
        job_id = create_job(parse_spec(_spec(tiny_model, dataset, [tool])), layout)
        result = run_job(job_id, layout)
        assert result.status == "failed" and (result.error or "").startswith(reason), result.error
        assert not [e for e in event_dicts(layout.job_events(job_id)) if e["type"] == "stage"]   # nothing loaded


def test_report_to_is_how_metrics_travel_not_what_is_learned():
    plain = parse_spec({"name": "a", "base_model": "m", "dataset": "d"})
    reported = parse_spec({"name": "a", "base_model": "m", "dataset": "d", "report_to": ["tensorboard", "mlflow"]})
    assert plain.fingerprint() == reported.fingerprint()
    with pytest.raises(ValueError, match="report_to: names a tool more than once"):
        parse_spec({"name": "a", "base_model": "m", "dataset": "d", "report_to": ["mlflow", "mlflow"]})
    with pytest.raises(ValueError, match="report_to.0: must be one of 'tensorboard', 'mlflow' or 'wandb'"):
        parse_spec({"name": "a", "base_model": "m", "dataset": "d", "report_to": ["neptune"]})


def test_a_resumed_job_continues_its_mlflow_run_and_tensorboard_keeps_one_point_a_step(layout, tiny_model, tmp_path,
                                                                                       monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_rows(30))
    spec = _spec(tiny_model, dataset, ["tensorboard", "mlflow"])
    spec["hyperparameters"].update(max_steps=40, save_steps=3, eval_steps=100)
    job_id = create_job(parse_spec(spec), layout)
    engine = subprocess.Popen([sys.executable, "-m", "usf_bios.engine.run", job_id], env=dict(os.environ),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not list(layout.job_checkpoints(job_id).glob("checkpoint-*/trainer_state.json")):
        assert engine.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    engine.send_signal(signal.SIGKILL)
    engine.wait()
    first_run = (layout.job_output(job_id) / ".mlflow_run_id").read_text()

    result = run_job(job_id, layout)
    assert result.status == "completed", result.error
    assert "resuming from checkpoint-" in layout.job_log(job_id).read_text()
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("usf-bios").experiment_id])
    assert [r.info.run_id for r in runs] == [first_run] and runs[0].info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(first_run, "train/loss")} == set(range(1, 41))

    board = EventAccumulator(str(layout.logs / f"{job_id}.tensorboard"))   # both runs' files, as TensorBoard reads them
    board.Reload()
    steps = [s.step for s in board.Scalars("train/loss")]
    assert steps == list(range(1, 41)), steps
    assert len(list((layout.logs / f"{job_id}.tensorboard").glob("events.out.tfevents.*"))) == 2
