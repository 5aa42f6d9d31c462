"""The CLI's client commands: `usf-bios jobs list|show|logs|cancel|resume|delete|download` and `usf-bios submit`,
talking to a running server (``USF_SERVER_URL``, default http://127.0.0.1:8000; ``USF_API_KEY``) through
``usf_bios.client``. Exit status: 0 done, 1 the followed job failed, 2 the server refused or cannot be reached,
3 the followed job was cancelled."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn, TransferSpeedColumn)
from rich.table import Table

from usf_bios.client import Client, ServerError
from usf_bios.settings import get_settings

jobs_app = typer.Typer(help="Jobs on a running server (USF_SERVER_URL, USF_API_KEY): list, show, follow, logs, "
                            "cancel, resume, delete, download.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)
STATUS_STYLE = {"completed": "green", "failed": "red", "cancelled": "yellow", "cancelling": "yellow",
                "interrupted": "magenta", "running": "cyan", "preparing": "cyan", "queued": "blue"}
EXIT_FOR = {"completed": 0, "failed": 1, "cancelled": 3}

JobId = Annotated[str, typer.Argument(help="The job's id (`usf-bios jobs list` shows them).")]


def _client() -> Client:
    return Client.from_settings(get_settings())


def _fail(err: ServerError | str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def _status(value: str) -> str:
    return f"[{STATUS_STYLE.get(value, 'white')}]{value}[/]"


def _loss(job: dict[str, Any]) -> str:
    loss = (job.get("metrics") or {}).get("loss")
    return f"{loss:.4f}" if isinstance(loss, (int, float)) else "–"


def _steps(job: dict[str, Any]) -> str:
    return f"{job['current_step']}/{job['total_steps']}" if job.get("total_steps") else str(job.get("current_step", 0))


@jobs_app.command("list")
def list_jobs(
    status: Annotated[Optional[str], typer.Option(help="Only jobs with this status (queued, running, completed, …).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="At most this many, newest first.")] = 50,
) -> None:
    """The server's jobs, newest first."""
    try:
        with _client() as client:
            page = client.list_jobs(status, limit)
    except ServerError as err:
        raise _fail(err) from None
    table = Table("id", "name", "status", "step", "loss", "created", title=f"{page['total']} job(s)")
    for job in page["items"]:
        table.add_row(job["id"], job["name"], _status(job["status"]), _steps(job), _loss(job),
                      job["created_at"][:19].replace("T", " "))
    console.print(table)


def _show(job: dict[str, Any]) -> None:
    table = Table(show_header=False, title=f"job {job['id']}")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    spec = job.get("spec") or {}
    datasets = spec.get("datasets")
    rows = [("name", job["name"]), ("status", _status(job["status"])), ("stage", job.get("stage") or "–"),
            ("step", _steps(job) + (f" ({job['progress']:.0%})" if job.get("total_steps") else "")),
            ("loss", _loss(job)), ("base model", str(spec.get("base_model", "–"))),
            ("dataset", ", ".join(f"{d['name']} × {d['weight']:g}" for d in datasets) if datasets
             else str(spec.get("dataset", "–"))),
            ("created", job["created_at"]), ("started", job.get("started_at") or "–"),
            ("finished", job.get("finished_at") or "–"), ("attempts", f"{job['attempts']}/{job['max_attempts']}")]
    if job.get("artifact"):
        rows.append(("adapter", f"{job['artifact']['name']} v{job['artifact']['version']} "
                                f"(`usf-bios jobs download {job['id']}`)"))
    if job.get("error"):
        rows.append(("error", f"[red]{escape(job['error'])}[/]"))
    for field, value in rows:
        table.add_row(field, value if field in ("status", "error") else escape(value))
    console.print(table)


def follow(client: Client, job_id: str) -> str:
    """Show the job's progress live (a bar on a terminal, a line per step otherwise) until it is final; its final
    status."""
    job = client.get_job(job_id)
    status = job["status"]
    live = console.is_terminal
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, disable=not live)
    with progress:
        task = progress.add_task(status, total=job.get("total_steps"), completed=job["current_step"], loss=_loss(job))
        for kind, data in client.events(job_id):
            if kind == "status":
                if data["status"] != status:
                    status = data["status"]
                    if not live:
                        console.print(f"status {status}" + (f": {data['error']}" if data.get("error") else ""),
                                      highlight=False, soft_wrap=True)
                progress.update(task, description=status, total=data.get("total_steps"),
                                completed=data["current_step"])
            elif kind == "stage" and data.get("total_steps"):
                progress.update(task, total=data["total_steps"])
            elif kind == "metric":
                progress.update(task, completed=data["step"], loss=f"{data['loss']:.4f}")
                if not live:
                    total = progress.tasks[0].total
                    console.print(f"step {data['step']}{f'/{int(total)}' if total else ''} loss {data['loss']:.4f}",
                                  highlight=False)
            elif kind == "eval" and not live:
                console.print(f"step {data['step']} validation_loss {data['validation_loss']:.4f}", highlight=False)
    final = client.get_job(job_id)
    _show(final)
    return final["status"]


def _exit_for(status: str) -> typer.Exit:
    return typer.Exit(EXIT_FOR.get(status, 0))


@jobs_app.command("show")
def show(
    job_id: JobId,
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="Follow it live until it ends (exit 0 completed, "
                                                                  "1 failed, 3 cancelled).")] = False,
) -> None:
    """One job: status, progress, loss, references, error."""
    try:
        with _client() as client:
            if follow_:
                raise _exit_for(follow(client, job_id))
            _show(client.get_job(job_id))
    except ServerError as err:
        raise _fail(err) from None


@jobs_app.command("logs")
def logs(job_id: JobId, tail: Annotated[int, typer.Option(min=1, max=100_000, help="Last lines.")] = 200) -> None:
    """The end of the job's log."""
    try:
        with _client() as client:
            text = client.logs(job_id, tail)
    except ServerError as err:
        raise _fail(err) from None
    print(text, end="")


def _change(action: str, job_id: str, follow_: bool = False) -> None:
    """POST /api/jobs/{id}/{action} (cancel, resume), print the status it answers, then follow it when asked."""
    try:
        with _client() as client:
            job = getattr(client, action)(job_id)
            console.print(f"job {job['id']}: {_status(job['status'])}", highlight=False)
            if follow_:
                raise _exit_for(follow(client, job_id))
    except ServerError as err:
        raise _fail(err) from None


@jobs_app.command("cancel")
def cancel(job_id: JobId) -> None:
    """Cancel: a queued job at once; a running one saves a checkpoint first."""
    _change("cancel", job_id)


@jobs_app.command("resume")
def resume(
    job_id: JobId,
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="Then follow it live until it ends.")] = False,
) -> None:
    """Queue a cancelled, failed or interrupted job again; it continues from its newest checkpoint."""
    _change("resume", job_id, follow_)


@jobs_app.command("delete")
def delete(
    job_id: JobId,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a finished job: its row, metric points and files (DELETE /api/jobs/{id}; cancel a running one first)."""
    if not yes and not typer.confirm(f"Delete job {job_id} with its adapter, checkpoints and logs?"):
        raise typer.Exit(1)
    try:
        with _client() as client:
            client.delete(job_id)
    except ServerError as err:
        raise _fail(err) from None
    console.print(f"deleted job {job_id}", highlight=False)


@jobs_app.command("download")
def download(
    job_id: JobId,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="The tar file (default ./JOB_ID.tar).")] = None,
) -> None:
    """The finished job's output folder (adapter, tokenizer, job.yaml, training log) as a tar."""
    dest = output or Path(f"{job_id}.tar")
    progress = Progress(TextColumn("[bold]download"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        console=console, disable=not console.is_terminal)
    try:
        with _client() as client, progress:
            task = progress.add_task("download", total=None)
            size = client.download(job_id, dest, lambda done: progress.update(task, completed=done))
    except ServerError as err:
        raise _fail(err) from None
    console.print(f"job {job_id} → {dest} ({size:,} bytes)", highlight=False)


def submit(
    spec_file: Annotated[Path, typer.Argument(help="Job spec (YAML or JSON); base_model and dataset name what is "
                                                   "registered on the server.")],
    preset: Annotated[Optional[str], typer.Option("--preset", help="Start from a preset; the file's fields win.")] = None,
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="Follow the job live until it ends.")] = False,
) -> None:
    """Send a job spec to the server (USF_SERVER_URL) and print the job's id; the server queues and runs it."""
    from usf_bios.spec import SpecError, load_spec

    try:
        spec = load_spec(spec_file, preset)
    except SpecError as err:
        raise _fail(str(err)) from None
    data = spec.model_dump(mode="json", exclude_none=False)
    data.pop("datasets" if spec.datasets is None else "dataset")
    try:
        with _client() as client:
            job = client.submit(data)
            console.print(f"job [bold]{job['id']}[/] {_status(job['status'])} on {client.url}", highlight=False)
            if follow_:
                raise _exit_for(follow(client, job["id"]))
    except ServerError as err:
        raise _fail(err) from None
