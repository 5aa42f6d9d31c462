"""Run one job: setup → train → save → cleanup.

``python -m usf_bios.engine.run JOB_ID`` runs the job whose locked spec is
``data/output/JOB_ID/job.yaml``, continuing from its newest complete checkpoint if it has one.
Exit status: 0 completed, 1 failed, 3 cancelled (SIGTERM or Ctrl-C: a checkpoint is saved first), 4 interrupted
(a job on several ranks lost one of them: no ``done`` event, the control plane resumes it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from usf_bios.datasets.mixture import DatasetMixture, load_mixture
from usf_bios.engine import checkpoint as ckpt
from usf_bios.engine import distributed, fsdp
from usf_bios.engine.distributed import World, world_from_env
from usf_bios.engine.data import TokenizationError, TrainingData, encode_example
from usf_bios.engine.events import DoneEvent, EventLog, read_events
from usf_bios.engine.jobdir import ResumeRefused, locked_spec
from usf_bios.engine.loop import TrainingRun, make_optimizer, train
from usf_bios.engine.loss import loss_sum
from usf_bios.engine.memory import prefer_expandable_segments
from usf_bios.engine.model import build_model, choose_placement, free_gpu_memory, load_base_model, load_tokenizer
from usf_bios.engine.output import write_outputs
from usf_bios.engine.plan import resolve_plan
from usf_bios.engine.reporters import Reporters, check_reporters, open_reporters
from usf_bios.engine.threads import use_cpu_share
from usf_bios.models.sources import ResolvedModel, resolve_model
from usf_bios.models.inspect import parameter_count
from usf_bios.models.validate import check_model_folder
from usf_bios.settings import get_settings
from usf_bios.spec import JobSpec
from usf_bios.status import JobStatus
from usf_bios.storage import StorageLayout

EXIT_CODES = {JobStatus.COMPLETED: 0, JobStatus.FAILED: 1, JobStatus.CANCELLED: 3, JobStatus.INTERRUPTED: 4}


class JobAlreadyRunning(ResumeRefused):
    """Another engine process holds the job's lock."""


@contextmanager
def job_lock(folder: Path) -> Iterator[None]:
    """One engine process per job: an exclusive lock on ``{output}/.lock`` for the whole run."""
    with (folder / ".lock").open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobAlreadyRunning(f"job {folder.name} is already running in another process") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class JobResult:
    job_id: str
    status: JobStatus      # completed | failed | cancelled | interrupted (a rank of the job was lost)
    output_dir: Path
    error: str | None = None


class _StopFlag:
    """Set by SIGTERM (or a first Ctrl-C): the loop saves a checkpoint and ends the job as cancelled."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: object) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once


def _tokenize(mixture: DatasetMixture, tokenizer: object, spec: JobSpec, events: EventLog) -> TrainingData:
    hp = spec.hyperparameters
    encoded, sources, truncated, empty = [], [], 0, 0
    for source, (dataset, _weight) in enumerate(mixture.parts):
        for example in dataset.examples:
            try:
                item = encode_example(example, tokenizer, hp.max_seq_length, hp.train_on_inputs)
            except TokenizationError as err:
                raise TokenizationError(f"{dataset.path}:{example.line}: {err}") from None
            truncated += item.truncated
            if item.trained_tokens == 0:
                empty += 1
                continue
            encoded.append(item)
            sources.append(source)
    if truncated:
        events.log(f"{truncated} of {mixture.example_count} examples were truncated to max_seq_length {hp.max_seq_length}")
    if empty:
        events.log(f"{empty} examples had no trained tokens left after truncation and were dropped")
    if not encoded:
        raise TokenizationError("no example has a trained token left; raise max_seq_length")
    weights = [weight for _, weight in mixture.parts] if mixture.weighted else None
    if weights is not None:
        events.log("datasets: " + ", ".join(f"{d.path.name} × {w:g}" for d, w in mixture.parts))
    return TrainingData(encoded, batch_size=hp.batch_size, max_seq_length=hp.max_seq_length, packing=hp.packing,
                        val_split=hp.val_split, seed=hp.seed, pad_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
                        sources=sources, weights=weights)


def _total_steps(spec: JobSpec, data: TrainingData, world: World) -> int:
    hp = spec.hyperparameters
    if hp.max_steps:
        return hp.max_steps
    per_epoch = -(-data.micro_batches_per_epoch // (hp.gradient_accumulation_steps * world.size))
    return per_epoch * hp.num_epochs


def _scheduler(optimizer: torch.optim.Optimizer, spec: JobSpec, total_steps: int) -> object:
    from transformers import get_scheduler

    hp = spec.hyperparameters
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[hp.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=round(hp.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def run_job(job_id: str, layout: StorageLayout, *, show_progress: bool = False, echo: bool = False) -> JobResult:
    """Run (or continue) a job to its end and return how it ended; never raises for a job failure.

    The model and optimizer live only inside ``_run``, so GPU memory is free once this returns.
    """
    prefer_expandable_segments()
    spec = locked_spec(job_id, layout)
    world = world_from_env()
    distributed.die_with_launcher(world)
    # one engine per job: its rank 0 holds the lock (the other ranks of a torchrun job run beside it)
    with job_lock(layout.job_output(job_id)) if world.is_main else contextlib.nullcontext():
        try:
            return _run(job_id, spec, layout, world, show_progress=show_progress, echo=echo)
        finally:
            free_gpu_memory()
            distributed.stop()


@dataclass
class Recipe:
    """What setup builds for the training loop and the save step."""

    run: TrainingRun
    tokenizer: Any
    model_source: ResolvedModel
    dataset: DatasetMixture
    reporters: Reporters


def setup(job_id: str, spec: JobSpec, layout: StorageLayout, events: EventLog, stop: _StopFlag,
          show_progress: bool, world: World = World()) -> Recipe:
    """Load the model with its speed plan, tokenize the dataset, build the optimizer and scheduler, and continue
    from the newest checkpoint when there is one."""
    hp, checkpoint_dir = spec.hyperparameters, layout.job_checkpoints(job_id)
    check_reporters(spec)   # a report_to tool that cannot work fails the job before the model loads
    resume_from = ckpt.latest_checkpoint(checkpoint_dir)
    ckpt.clean_partial(checkpoint_dir)
    events.log(f"job {job_id}: {'resuming from ' + resume_from.name if resume_from else 'starting'} (pid {os.getpid()})")
    use_cpu_share(spec, get_settings(), events.log)  # a CPU job computes with its share of the cores
    torch.manual_seed(hp.seed)
    events.stage("loading_model")
    placement = choose_placement(spec, world)
    distributed.start(world, placement.device.type)
    resolved = resolve_model(spec.base_model, layout, get_settings().supported_model_sources)
    config = check_model_folder(resolved.path)
    strategy, why = distributed.choose_strategy(spec, world.size, config, parameter_count(resolved.path),
                                                gpu_bytes(placement))
    sharded = strategy == "fsdp"
    if world.distributed:
        events.log(f"rank {world.rank} of {world.size} ({'FSDP2' if sharded else 'DistributedDataParallel'}, "
                   f"{'NCCL' if placement.device.type == 'cuda' else 'gloo'}): an optimizer step takes "
                   f"{hp.gradient_accumulation_steps * world.size} micro-batches of {hp.batch_size} rows "
                   f"(global batch {hp.batch_size * hp.gradient_accumulation_steps * world.size} rows); {why}")
    if world.size != spec.gpu_config.world_size:   # started by hand (torchrun, or usf-bios train)
        events.log(f"the spec asks for {spec.gpu_config.world_size} rank(s); this run has {world.size}, so a step "
                   f"takes {hp.gradient_accumulation_steps * world.size} micro-batches (the server starts a job on "
                   "the ranks its spec names)")
    events.log(f"base model {resolved.path} ({resolved.source}) on {placement.device} in {placement.precision}")
    tokenizer = load_tokenizer(resolved, spec.trust_remote_code)
    plan = resolve_plan(spec.performance, hp, placement)
    if sharded:
        plan, off = fsdp.fsdp_plan(plan)
        for line in off:
            events.log(line)
        if hp.quantization == "4bit":
            events.log("QLoRA with FSDP2: the 4-bit weights are stored as " + placement.precision + " "
                       "(bnb_4bit_quant_storage) so FSDP2 can shard them; this path has not been run on GPUs yet")
    elif world.distributed and plan.host_embeddings:   # DDP refuses a model on two kinds of device
        plan = replace(plan, host_embeddings=False)
        events.log("host embeddings off: DistributedDataParallel takes a model whose parameters are all on one kind "
                   "of device")
    base = load_base_model(resolved, spec, placement, config, sharded=sharded)
    model, plan, notes = build_model(base, spec, plan, placement)
    for note in notes:
        events.log(note)
    events.stage("tokenizing")
    dataset = load_mixture(spec.dataset_refs(), spec.dataset_format, layout)
    data = _tokenize(dataset, tokenizer, spec, events)
    total_steps = _total_steps(spec, data, world)
    state = ckpt.TrainerState(total_steps=total_steps, data_sha256=dataset.sha256, spec_fingerprint=spec.fingerprint(),
                              world_size=world.size, strategy="fsdp" if sharded else "")
    if resume_from is not None:
        _refuse_mismatch(resume_from, state)
    loss_fn = lambda m, b: loss_sum(m, b, loss=plan.loss, attention=plan.attention)  # noqa: E731
    wrapped = None
    if sharded:   # the adapter is restored whole, then every parameter sharded; the optimizer sees the shards
        if resume_from is not None:
            ckpt.restore_adapter(resume_from, model)
        wrapped = fsdp.shard(model, loss_fn, placement.device, placement.dtype, world)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], hp, plan)
    scheduler = _scheduler(optimizer, spec, total_steps)
    if resume_from is not None:
        state = ckpt.restore_checkpoint(resume_from, model, optimizer, scheduler, sharded=sharded)
        events.log(f"resumed at step {state.step} (epoch {state.epoch}, micro-batch {state.micro_batch})")
    events.log(f"{len(data.train_examples)} training / {len(data.val_examples)} validation examples, "
               f"{len(data.train_rows)} rows, {data.micro_batches_per_epoch} micro-batches per epoch, {total_steps} steps")
    if strategy == "ddp":
        wrapped = distributed.wrap_ddp(model, loss_fn, world)
    run = TrainingRun(model, optimizer, scheduler, data, placement, hp, state, events, checkpoint_dir,
                      should_stop=lambda: stop.requested, plan=plan, show_progress=show_progress and world.is_main,
                      world=world, ddp=wrapped, sharded=sharded)
    # the job's numbers are rank 0's: only it reports to TensorBoard / MLflow / W&B
    reporters = open_reporters(spec if world.is_main else spec.model_copy(update={"report_to": []}), job_id, layout,
                               state.step, events.log)
    events.sinks.append(reporters.on_event)
    return Recipe(run, tokenizer, resolved, dataset, reporters)


def gpu_bytes(placement: Any) -> float | None:
    """The memory of the rank's GPU (None on the CPU)."""
    if placement.device.type != "cuda":
        return None
    return float(torch.cuda.get_device_properties(placement.device).total_memory)


def _refuse_mismatch(folder: Path, state: ckpt.TrainerState) -> None:
    """Refuse to continue from ``folder`` when the dataset, the number of ranks, the sharding or the spec changed
    since it was saved."""
    saved = ckpt.read_state(folder)
    if saved.data_sha256 != state.data_sha256:
        raise ResumeRefused(f"the dataset changed since {folder.name} was saved "
                            f"(sha256 {saved.data_sha256[:12]}… → {state.data_sha256[:12]}…); start a new job")
    if saved.world_size != state.world_size:
        raise ResumeRefused(f"{folder.name} was saved by a job on {saved.world_size} rank(s); this run has "
                            f"{state.world_size} (the data order of a step depends on it): resume on "
                            f"{saved.world_size} GPU(s)")
    if (saved.strategy == "fsdp") != (state.strategy == "fsdp"):
        was, now = ("FSDP2", "DistributedDataParallel") if saved.strategy == "fsdp" else ("DistributedDataParallel", "FSDP2")
        raise ResumeRefused(f"{folder.name} was saved under {was} and this run uses {now} (their optimizer states "
                            f"differ): set gpu_config.strategy: {'fsdp' if saved.strategy == 'fsdp' else 'ddp'}")
    if saved.spec_fingerprint != state.spec_fingerprint:
        raise ResumeRefused(f"the job's spec changed since {folder.name} was saved; start a new job")


def save(output_dir: Path, recipe: Recipe, spec: JobSpec, events: EventLog,
         adapter: dict[str, Any] | None = None) -> None:
    """The finished adapter (under FSDP2 the full tensors ``adapter`` gathered onto rank 0), tokenizer, training
    log and model card in the job's output folder."""
    events.stage("saving")
    run, dataset = recipe.run, recipe.dataset
    facts = {"dataset_format": dataset.format, "dataset_sha256": dataset.sha256,
             "train_examples": len(run.data.train_examples), "validation_examples": len(run.data.val_examples),
             "total_steps": run.state.total_steps, "device": str(run.placement.device),
             "precision": run.placement.precision, "model_source": recipe.model_source.source}
    write_outputs(output_dir, run.model, recipe.tokenizer, spec, recipe.model_source.path, events.events_path, facts,
                  adapter)


def rank_events(job_id: str, layout: StorageLayout, world: World, echo: bool) -> EventLog:
    """Rank 0 writes the job's events and log; another rank its own (``{job_id}.rank{N}.…``), which nothing
    follows: the job's numbers are rank 0's, over the whole step."""
    if world.is_main:
        return EventLog(layout.job_events(job_id), layout.job_log(job_id), echo=echo)
    return EventLog(layout.logs / f"{job_id}.rank{world.rank}.events.jsonl", layout.logs / f"{job_id}.rank{world.rank}.log")


def peer_failure(job_id: str, layout: StorageLayout, world: World, since: float) -> str | None:
    """A failure another rank recorded in its own events since ``since`` (its reason, naming the rank), if any."""
    for rank in range(1, world.size):
        events, _ = read_events(layout.logs / f"{job_id}.rank{rank}.events.jsonl")
        for event in reversed(events):
            # an event's ts is rounded to the millisecond: one written just as ``since`` was taken still counts
            if isinstance(event, DoneEvent) and event.ts >= since - 0.001 and event.status == JobStatus.FAILED:
                return f"rank {rank}: {event.error}"
    return None


def _run(job_id: str, spec: JobSpec, layout: StorageLayout, world: World, *, show_progress: bool,
         echo: bool) -> JobResult:
    """setup → train → save → cleanup; a failure at any step ends the job as failed with its reason, except the
    loss of another rank, which leaves the job without a verdict (interrupted: the control plane resumes it)."""
    started = time.time()
    output_dir = layout.job_output(job_id)
    events = rank_events(job_id, layout, world, echo)
    stop = _StopFlag()
    stop.install()
    recipe: Recipe | None = None
    status = JobStatus.FAILED
    try:
        recipe = setup(job_id, spec, layout, events, stop, show_progress, world)
        events.stage("training", total_steps=recipe.run.state.total_steps)
        if train(recipe.run) == JobStatus.CANCELLED:
            status = JobStatus.CANCELLED
            events.done(status)
            return JobResult(job_id, status, output_dir)
        adapter = fsdp.gather_adapter(recipe.run.model) if recipe.run.sharded else None   # every rank takes part
        if world.is_main:
            save(output_dir, recipe, spec, events, adapter)
        status = JobStatus.COMPLETED
        events.done(status)
        return JobResult(job_id, status, output_dir)
    except Exception as err:  # the job fails; the process does not crash without a word
        message = f"{type(err).__name__}: {err}" if not isinstance(err, (ValueError, LookupError, RuntimeError)) else str(err)
        events.log(traceback.format_exc(), echo=False)   # for the log file; the caller prints the one-line reason
        if distributed.peer_lost(err, world):
            failure = peer_failure(job_id, layout, world, started) if world.is_main else None
            if failure is None:
                status = JobStatus.INTERRUPTED
                events.log(f"rank {world.rank} of {world.size}: another rank of the job was lost "
                           f"({message.splitlines()[0][:200]}); the job is interrupted and resumes from its newest "
                           "checkpoint")
                return JobResult(job_id, status, output_dir, message)
            message = failure
        events.done(JobStatus.FAILED, error=message)
        return JobResult(job_id, JobStatus.FAILED, output_dir, message)
    finally:  # cleanup
        if recipe is not None:
            recipe.reporters.close(status)
        events.close()
        stop.uninstall()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m usf_bios.engine.run JOB_ID", file=sys.stderr)
        return 2
    layout = StorageLayout.from_settings(get_settings())
    try:
        result = run_job(args[0], layout)
    except ResumeRefused as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return EXIT_CODES[result.status]


if __name__ == "__main__":
    sys.exit(main())
