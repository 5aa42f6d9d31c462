"""The local executor behind the scheduler's one interface, on a real engine process and a tiny model: it starts the
job, hands back its typed events after a cursor, says when the process is gone, and stops it on request."""

from __future__ import annotations

import time

from tests.conftest import chat_rows, write_jsonl
from tests.engine.test_run import make_spec
from usf_bios.control.executors.base import Executor, Progress
from usf_bios.control.executors.local import LocalExecutor
from usf_bios.engine.events import DoneEvent, MetricEvent
from usf_bios.engine.jobdir import create_job
from usf_bios.settings import get_settings
from usf_bios.spec import parse_spec


def follow(executor: LocalExecutor, handle: str, job_id: str, until, timeout: float = 240) -> tuple[list, Progress]:
    events, cursor, deadline = [], 0, time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = executor.poll(handle, cursor, job_id)
        events += progress.events
        cursor = progress.cursor
        if until(events, progress):
            return events, progress
        time.sleep(0.2)
    raise TimeoutError(f"the job did not get there in {timeout} s: {events[-3:]}")


def test_a_job_runs_to_its_end_through_the_interface(layout, tiny_model, tmp_path):
    executor = LocalExecutor(layout, get_settings())
    assert isinstance(executor, Executor) and executor.resources().cpu_slots == get_settings().max_cpu_jobs
    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    job_id = create_job(parse_spec(make_spec(tiny_model, dataset, num_epochs=1)), layout)
    handle = executor.start(job_id, [])
    assert executor.describe(handle) == f"local process {handle.split(':')[0]}"
    events, progress = follow(executor, handle, job_id, lambda ev, p: not p.alive)
    assert isinstance(events[-1], DoneEvent) and events[-1].status == "completed"
    total = next(e.total_steps for e in events if e.type == "stage" and e.stage == "training")
    assert [e.step for e in events if isinstance(e, MetricEvent)] == list(range(1, total + 1))
    assert progress.exit_code == 0 and progress.cursor == layout.job_events(job_id).stat().st_size
    again = executor.poll(handle, progress.cursor, job_id)     # nothing new after the cursor
    assert again.events == [] and not again.alive
    executor.forget(handle)


def test_cancel_asks_the_engine_to_checkpoint_and_stop(layout, tiny_model, tmp_path):
    executor = LocalExecutor(layout, get_settings())
    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_rows(40))
    job_id = create_job(parse_spec(make_spec(tiny_model, dataset, num_epochs=1000, save_steps=1000)), layout)
    handle = executor.start(job_id, [])
    follow(executor, handle, job_id, lambda ev, p: any(isinstance(e, MetricEvent) for e in ev))
    executor.cancel(handle, kill=False)
    events, progress = follow(executor, handle, job_id, lambda ev, p: not p.alive, timeout=120)
    assert isinstance(events[-1], DoneEvent) and events[-1].status == "cancelled" and progress.exit_code == 3
    assert any(e.type == "checkpoint" for e in events)


def test_a_sigkill_of_torchrun_takes_every_rank_with_it(layout, tiny_model, tmp_path):
    """A job of two CPU ranks runs under torchrun, which starts each rank in a session of its own; the scheduler's
    last word to a job that will not stop (cancel with kill) reaches torchrun's group only, and the ranks die with
    it (PR_SET_PDEATHSIG)."""
    from tests.api.test_distributed_jobs import job_processes

    executor = LocalExecutor(layout, get_settings())
    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    spec = make_spec(tiny_model, dataset, max_steps=5000, save_steps=5000, eval_steps=5000)
    job_id = create_job(parse_spec({**spec, "gpu_config": {"num_gpus": 0, "num_processes": 2}}), layout)
    handle = executor.start(job_id, [])
    follow(executor, handle, job_id, lambda ev, p: any(isinstance(e, MetricEvent) for e in ev))
    assert set(job_processes(job_id)) == {"launcher", "0", "1"}
    executor.cancel(handle, kill=True)
    deadline = time.monotonic() + 10   # a process that is exiting has an empty cmdline before it can be reaped
    while (job_processes(job_id) or executor.poll(handle, 0, job_id).alive) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job_processes(job_id) == {}
    assert not executor.poll(handle, 0, job_id).alive


def test_a_job_of_several_ranks_runs_under_torchrun_with_its_cores_split(monkeypatch):
    from usf_bios.control.executors.local import engine_command, rank_threads
    from usf_bios.settings import Settings

    assert engine_command("j", 1)[1:] == ["-m", "usf_bios.engine.run", "j"]
    assert engine_command("j", 4)[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                                           "--max-restarts=0"]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    settings = Settings(max_cpu_jobs=2)
    assert rank_threads(settings, 1, False, 16) is None            # one rank: the engine's own share (threads.py)
    assert rank_threads(settings, 2, False, 16) == 4               # a CPU slot's 8 cores over 2 ranks
    assert rank_threads(settings, 8, True, 16) == 2                # every core over 8 GPU ranks
    assert rank_threads(settings, 4, False, 2) == 1
    assert rank_threads(Settings(max_cpu_jobs=2, cpu_threads_per_job=3), 2, False, 16) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert rank_threads(settings, 2, False, 16) is None            # the user's OMP_NUM_THREADS stands
