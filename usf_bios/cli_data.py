"""`usf-bios models import-gguf|pull|list` and `usf-bios datasets check`: base models and dataset files on this
host (no server needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from usf_bios.cli_common import console, fail as _fail, layout as _layout
from usf_bios.datasets.formats import FORMATS
from usf_bios.settings import get_settings

models_app = typer.Typer(help="Base models: pull, import and list.", no_args_is_help=True)
datasets_app = typer.Typer(help="Datasets: check a file before training.", no_args_is_help=True)


@models_app.command("import-gguf")
def import_gguf_cmd(
    gguf_file: Annotated[Path, typer.Argument(help="The .gguf file.")],
    name: Annotated[str, typer.Option("--name", help="Folder name under USF_MODEL_PATH, as {org}--{model}.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing folder of that name.")] = False,
) -> None:
    """Turn a GGUF file into a plain model folder (bf16 safetensors + tokenizer)."""
    from usf_bios.models.gguf import import_gguf
    from usf_bios.storage import PathOutsideRoot

    try:
        with console.status(f"dequantizing {gguf_file.name}…"):
            folder = import_gguf(gguf_file, name, _layout(), overwrite=overwrite)
    except (FileNotFoundError, FileExistsError, PathOutsideRoot) as err:
        raise _fail(str(err)) from None
    console.print(f"imported {name} → {folder}", highlight=False, soft_wrap=True)


@models_app.command("pull")
def pull_cmd(
    repo_id: Annotated[str, typer.Argument(help="The model on the hub, as org/name.")],
    revision: Annotated[Optional[str], typer.Option(help="Branch, tag or commit [default: main; ModelScope: master].")] = None,
    source: Annotated[str, typer.Option(help="huggingface or modelscope (the extra usf-bios[modelscope]).")] = "huggingface",
) -> None:
    """Download a model from the Hugging Face Hub into the hub cache ($HF_HOME/hub), or from ModelScope into
    MODELSCOPE_CACHE: config, tokenizer and weights (safetensors preferred); resumable; HF_TOKEN /
    MODELSCOPE_API_TOKEN for gated or private models, HF_ENDPOINT / MODELSCOPE_ENDPOINT for a mirror."""
    from usf_bios.models.hub import LABELS, PullError, cache_dir, endpoint, plan_pull, pull_model, refusal, token

    off = refusal(source, get_settings().supported_model_sources)
    if off:
        raise _fail(f"models pull: downloads from {LABELS.get(source, source)} are off here: {off}")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise _fail(f"models pull: {repo_id!r} is not org/name")
    secret = token(source)
    try:
        plan = plan_pull(repo_id, revision, secret, source)
        commit = f" ({plan.commit[:12]})" if plan.commit != plan.revision else ""
        console.print(f"{repo_id}@{plan.revision}{commit} from {endpoint(source)}: {len(plan.files)} files, "
                      f"{plan.total_bytes / 1e6:,.1f} MB", highlight=False)
        folder = pull_model(plan, cache_dir(source, _layout()), secret)
    except PullError as err:
        raise _fail(str(err), 1) from None
    console.print(f"pulled {repo_id} → {folder}\nuse it as base_model: {repo_id}", highlight=False, soft_wrap=True)


@models_app.command("list")
def list_models() -> None:
    """Model folders under USF_MODEL_PATH and whether they are usable."""
    from usf_bios.models.validate import ModelFolderError, check_model_folder

    root = _layout().models
    table = Table("name", "type", "state")
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []:
        try:
            config = check_model_folder(folder)
            table.add_row(folder.name, str(config.get("model_type")), "[green]ok[/]")
        except ModelFolderError as err:
            table.add_row(folder.name, "?", "[red]" + escape("; ".join(err.problems)) + "[/]")
    console.print(table)


@datasets_app.command("check")
def check_dataset(
    file: Annotated[Path, typer.Argument(help="JSONL, JSON or CSV file.")],
    dataset_format: Annotated[str, typer.Option("--format", help="auto or one of: " + ", ".join(FORMATS))] = "auto",
    model: Annotated[str, typer.Option(help="Model whose tokenizer counts the tokens.")] = "HuggingFaceTB--SmolLM2-135M-Instruct",
    max_seq_length: Annotated[int, typer.Option(min=8)] = 2048,
) -> None:
    """Validate a dataset file and print its format, rows and token-length statistics."""
    from usf_bios.datasets.formats import DatasetError, load_dataset
    from usf_bios.datasets.stats import token_stats
    from usf_bios.engine.data import TokenizationError
    from usf_bios.engine.model import load_tokenizer
    from usf_bios.models.sources import ModelNotFound, resolve_model

    try:
        dataset = load_dataset(file, dataset_format)  # type: ignore[arg-type]
    except (DatasetError, ValueError) as err:
        raise _fail(str(err), 1) from None
    console.print(f"{file}: [bold]{dataset.format}[/], {len(dataset.examples)} rows", highlight=False)
    try:
        resolved = resolve_model(model, _layout(), get_settings().supported_model_sources)
        stats = token_stats(dataset.examples, load_tokenizer(resolved, trust_remote_code=False), max_seq_length)
    except ModelNotFound as err:
        raise _fail(f"{err}\n(token statistics need a tokenizer: pass --model, or run `usf-bios demo` once)") from None
    except TokenizationError as err:
        raise _fail(str(err), 1) from None
    table = Table("tokens", "min", "mean", "p95", "max", f"truncated at {max_seq_length}")
    table.add_row(model, str(stats.min), str(stats.mean), str(stats.p95), str(stats.max), f"{stats.truncated} rows")
    console.print(table)
