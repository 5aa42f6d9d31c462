"""What a job's setup would refuse, found before the job exists: the base model resolved (its config and tokenizer
files read, no weights loaded), the dataset parsed (a bad row named by file and line), the device checked against
the spec. ``usf-bios train`` runs all of it and creates nothing on a fault; the server runs the device part on a
submit (its model and dataset were checked when they were registered)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from usf_bios.datasets.formats import DatasetError, LoadedDataset, load_dataset
from usf_bios.datasets.locate import DatasetNotFound, locate_dataset
from usf_bios.models.sources import ModelNotFound, ResolvedModel, resolve_model
from usf_bios.models.validate import ModelFolderError, check_model_folder
from usf_bios.spec import JobSpec
from usf_bios.storage import StorageLayout


class PreflightError(ValueError):
    """One fault, as the field of the spec it belongs to and the reason (one line)."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


@dataclass(frozen=True)
class Preflight:
    """What the checks found, for the caller to report."""

    model: ResolvedModel
    dataset: LoadedDataset


def device_faults(spec: JobSpec, gpus_available: int | None, *, local: bool) -> list[tuple[str, str]]:
    """The device rules, as (field path, reason): what the engine refuses on any machine (``device_problems``),
    more GPUs than the executor offers (``gpus_available``; None: not known here), and a quantized model without
    bitsandbytes where the engine runs on this host (``local``)."""
    from usf_bios.engine.model import device_problems

    problems = device_problems(spec)
    wanted, quantization = spec.gpu_config.num_gpus, spec.hyperparameters.quantization
    if gpus_available is not None and wanted > gpus_available:
        has = "no GPU" if gpus_available == 0 else f"{gpus_available} GPU{'s' if gpus_available > 1 else ''}"
        problems.append(("gpu_config.num_gpus", f"the job asks for {wanted} GPU{'s' if wanted > 1 else ''} and this "
                                                f"host has {has}; set gpu_config.num_gpus: 0 to train on the CPU"))
    if local and wanted > 0 and quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(("hyperparameters.quantization", f"{quantization} needs bitsandbytes; install it with "
                                                         "`pip install 'usf-bios[gpu]'`"))
    return problems


def check_model(spec: JobSpec, layout: StorageLayout, sources: tuple[str, ...]) -> ResolvedModel:
    """The base model's folder, its files checked and its config read; no weights are loaded."""
    from usf_bios.engine.model import needs_remote_code

    try:
        resolved = resolve_model(spec.base_model, layout, sources)
        config = check_model_folder(resolved.path)
    except ModelNotFound as err:
        raise PreflightError("base_model", str(err)) from None
    except ModelFolderError as err:
        raise PreflightError("base_model", f"model folder {err.folder} is not usable: {'; '.join(err.problems)}") from None
    if needs_remote_code(config) and not spec.trust_remote_code:
        raise PreflightError("trust_remote_code", f"{spec.base_model} ships its own model code "
                                                  f"({config.get('model_type')}); set trust_remote_code: true if you trust it")
    return resolved


def check_dataset(spec: JobSpec, layout: StorageLayout) -> LoadedDataset:
    """The dataset file found and parsed whole; the first bad row raises with its file and line."""
    try:
        return load_dataset(locate_dataset(spec.dataset, layout), spec.dataset_format)
    except DatasetNotFound as err:
        raise PreflightError("dataset", str(err)) from None
    except DatasetError as err:
        raise PreflightError("dataset", str(err)) from None


def check_tokenizer(spec: JobSpec, model: ResolvedModel, dataset: LoadedDataset) -> None:
    """Chat rows need a chat template: read the tokenizer's files (small; no weights) and say so now."""
    from usf_bios.engine.model import load_tokenizer

    if not any(example.templated for example in dataset.examples):
        return
    tokenizer = load_tokenizer(model, spec.trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        raise PreflightError("dataset", f"{dataset.path}: {dataset.format} rows need a chat template and the "
                                        f"tokenizer of {spec.base_model} has none; use a chat model, or the text format")


def check_local_device(spec: JobSpec) -> None:
    """The device rules for a job that runs here, on the GPUs this process sees (CUDA_VISIBLE_DEVICES decides)."""
    import torch

    from usf_bios.engine.model import ModelLoadError, choose_placement

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if problems := device_faults(spec, gpus, local=True):
        raise PreflightError(*problems[0])
    try:
        choose_placement(spec)        # bf16 on a GPU without it, …
    except ModelLoadError as err:
        field, _, reason = str(err).partition(": ")
        raise PreflightError(field, reason) from None


def preflight(spec: JobSpec, layout: StorageLayout, sources: tuple[str, ...]) -> Preflight:
    """Everything ``usf-bios train`` checks before it creates the job: device first (cheapest), then the model,
    the dataset and the tokenizer's chat template."""
    check_local_device(spec)
    model = check_model(spec, layout, sources)
    dataset = check_dataset(spec, layout)
    check_tokenizer(spec, model, dataset)
    return Preflight(model, dataset)
