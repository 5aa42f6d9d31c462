"""The job's metrics to the tools people already use (``report_to`` in the spec; each an optional extra, off by
default). Every metric and evaluation event the engine writes is also sent to:

- ``tensorboard``: event files in ``data/logs/{job_id}.tensorboard/`` (next to the job's log); a resumed job drops
  what was logged after its checkpoint (``purge_step``), so the curves have one point per step;
- ``mlflow``: a run named after the job in experiment ``MLFLOW_EXPERIMENT_NAME`` (default ``usf-bios``) at
  ``MLFLOW_TRACKING_URI``, which must be set: only a configured MLflow is used. A resume continues the same run
  (its id is kept in the output folder's ``.mlflow_run_id``);
- ``wandb``: a run in project ``WANDB_PROJECT`` (default ``usf-bios``) with the job id as its id (a resume
  continues it); needs ``WANDB_API_KEY`` or ``WANDB_MODE`` (``offline``).

``check_reporters`` refuses, before the model loads, a tool whose package is missing or that is not configured.
A tool that fails while the job trains is dropped with a line in the log; training goes on.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from usf_bios.engine.events import EvalEvent, MetricEvent
from usf_bios.spec import JobSpec
from usf_bios.status import JobStatus
from usf_bios.storage import StorageLayout

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
TRAIN_SCALARS = ("loss", "learning_rate", "grad_norm", "tokens_per_second", "gpu_memory_gb")


class ReporterError(ValueError):
    """A ``report_to`` tool that cannot be used here; the message starts with ``report_to:``."""


def _scalars(event: MetricEvent | EvalEvent) -> dict[str, float]:
    if isinstance(event, EvalEvent):
        return {"eval/loss": event.validation_loss}
    return {f"train/{name}": float(getattr(event, name)) for name in TRAIN_SCALARS if getattr(event, name) is not None}


def check_reporters(spec: JobSpec) -> None:
    """Each ``report_to`` tool importable and configured, else ReporterError naming the fix."""
    import importlib.util

    for tool in spec.report_to:
        if importlib.util.find_spec(PACKAGES[tool]) is None:
            raise ReporterError(f"report_to: {tool} needs the {PACKAGES[tool]} package: pip install 'usf-bios[{tool}]'")
        if tool == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
            raise ReporterError("report_to: mlflow needs MLFLOW_TRACKING_URI (a tracking server's URL, "
                                "sqlite:///path/mlflow.db, or file:/path with MLFLOW_ALLOW_FILE_STORE=true)")
        if tool == "wandb" and not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")):
            raise ReporterError("report_to: wandb needs WANDB_API_KEY (or WANDB_MODE=offline)")


class Reporter(Protocol):
    name: str

    def send(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self, status: JobStatus) -> None: ...


class TensorBoardReporter:
    name = "tensorboard"

    def __init__(self, folder: Path, resumed_at: int):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        # flushed every 5 s (not TensorBoard's 120): a live board follows the job, and a kill loses little
        self._writer = SummaryWriter(str(folder), purge_step=resumed_at + 1 if resumed_at else None, flush_secs=5)

    def send(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, step)

    def close(self, status: JobStatus) -> None:
        self._writer.close()


class MlflowReporter:
    name = "mlflow"

    def __init__(self, job_id: str, spec: JobSpec, run_file: Path):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
        run_id = run_file.read_text().strip() if run_file.is_file() else ""
        if not run_id:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "usf-bios"
            experiment = self._client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(name)
            run_id = self._client.create_run(experiment_id, run_name=job_id, tags={"usf_bios.job_id": job_id}).info.run_id
            params = {**spec.hyperparameters.model_dump(mode="json"), "base_model": spec.base_model,
                      "datasets": ", ".join(name for name, _ in spec.dataset_refs())}
            self._client.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])
            run_file.write_text(run_id)
        else:
            self._client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def send(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self, status: JobStatus) -> None:
        outcome = {JobStatus.COMPLETED: "FINISHED", JobStatus.CANCELLED: "KILLED"}.get(status, "FAILED")
        self._client.set_terminated(self.run_id, status=outcome)


class WandbReporter:
    name = "wandb"

    def __init__(self, job_id: str, spec: JobSpec, folder: Path):
        import re

        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        run_id = re.sub(r"[^A-Za-z0-9_-]", "-", job_id)[:128]
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "usf-bios", name=job_id, id=run_id,
                               resume="allow", dir=str(folder), config=spec.model_dump(mode="json"))

    def send(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log(scalars, step=step)

    def close(self, status: JobStatus) -> None:
        self._run.finish(exit_code=0 if status == JobStatus.COMPLETED else 1)


class Reporters:
    """The job's open reporters; ``on_event`` is the EventLog's sink for them."""

    def __init__(self, reporters: list[Reporter], log: Callable[[str], None]):
        self.reporters, self._log = reporters, log

    def _guard(self, reporter: Reporter, action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception as err:  # a tracking server going away must not stop the training
            self.reporters = [r for r in self.reporters if r is not reporter]
            self._log(f"report_to {reporter.name}: stopped after an error: {type(err).__name__}: {err}")

    def on_event(self, event: object) -> None:
        if isinstance(event, (MetricEvent, EvalEvent)):
            scalars = _scalars(event)
            for reporter in list(self.reporters):
                self._guard(reporter, lambda r=reporter: r.send(event.step, scalars))

    def close(self, status: JobStatus) -> None:
        for reporter in list(self.reporters):
            self._guard(reporter, lambda r=reporter: r.close(status))
        self.reporters = []


def open_reporters(spec: JobSpec, job_id: str, layout: StorageLayout, resumed_at: int,
                   log: Callable[[str], None]) -> Reporters:
    """The spec's reporters, opened (``check_reporters`` first); ``resumed_at``: the step a resume continues from."""
    check_reporters(spec)
    opened: list[Reporter] = []
    try:
        for tool in spec.report_to:
            if tool == "tensorboard":
                reporter: Reporter = TensorBoardReporter(layout.logs / f"{job_id}.tensorboard", resumed_at)
                log(f"report_to tensorboard: {layout.logs / f'{job_id}.tensorboard'}")
            elif tool == "mlflow":
                reporter = MlflowReporter(job_id, spec, layout.job_output(job_id) / ".mlflow_run_id")
                log(f"report_to mlflow: run {reporter.run_id} at {os.environ['MLFLOW_TRACKING_URI']}")
            else:
                reporter = WandbReporter(job_id, spec, layout.logs / f"{job_id}.wandb")
                log("report_to wandb: run " + job_id)
            opened.append(reporter)
    except Exception as err:
        for reporter in opened:
            reporter.close(JobStatus.FAILED)
        if isinstance(err, ReporterError):
            raise
        raise ReporterError(f"report_to: {spec.report_to[len(opened)]} could not start: {type(err).__name__}: {err}") from err
    return Reporters(opened, log)
