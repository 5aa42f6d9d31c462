""".github/workflows: actionlint-clean; ci.yml runs .ci/run; image.yml builds both Dockerfile targets and
tags them with the package version (its shell steps are run here with GitHub's variables set by hand)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.tools import ROOT, actionlint, dockerfile_stages

WORKFLOWS = ROOT / ".github" / "workflows"
VERSION_IN_PYPROJECT = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)[1]  # type: ignore[index]


def load(name: str) -> dict[str, Any]:
    workflow = yaml.safe_load((WORKFLOWS / name).read_text())
    workflow["on"] = workflow.pop(True, workflow.get("on"))   # YAML 1.1 reads the key `on` as true
    return workflow


def step(job: dict[str, Any], *, uses: str | None = None, name: str | None = None) -> dict[str, Any]:
    found = [s for s in job["steps"] if (uses and s.get("uses", "").startswith(uses + "@")) or (name and s.get("name") == name)]
    assert len(found) == 1, f"one step {uses or name}"
    return found[0]


def run_step(script: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-e", "-c", script], env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=30)


def test_the_workflows_pass_actionlint():
    assert sorted(p.name for p in WORKFLOWS.glob("*.yml")) == ["ci.yml", "image.yml"]
    assert actionlint(*sorted(WORKFLOWS.glob("*.yml"))) == []


def test_actionlint_reports_a_faulty_workflow(tmp_path: Path):
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text("on: push\njobs:\n  build:\n    runs-on: ubuntu-24.04\n    steps:\n"
                   "      - uses: docker/build-push-action@v7\n        with:\n          sbomm: true\n"
                   "      - run: echo ${{ steps.nope.outputs.version }}\n")
    findings = actionlint(bad)
    messages = " ".join(f["message"] for f in findings)
    assert "sbomm" in messages and "nope" in messages


def test_ci_runs_what_ci_run_runs_on_push_and_pull_request():
    workflow = load("ci.yml")
    assert {"push", "pull_request"} <= set(workflow["on"])
    (job,) = workflow["jobs"].values()
    assert job["runs-on"].startswith("ubuntu-")
    assert job["container"].startswith("python:3.11-"), "Python 3.11 on Debian, as .ci/run expects"
    assert step(job, name="Tests (.ci/run)")["run"].strip() == "bash .ci/run"
    torch = step(job, name="CPU build of torch")["run"]
    ci_run_torch = re.search(r"torch==[\d.]+", (ROOT / ".ci" / "run").read_text())
    assert ci_run_torch and ci_run_torch[0] in torch and "download.pytorch.org/whl/cpu" in torch


def test_the_image_workflow_builds_both_targets_with_cache_sbom_and_provenance():
    workflow = load("image.yml")
    assert workflow["on"]["push"]["tags"] == ["v*"]
    (job,) = workflow["jobs"].values()
    targets = {name for name in dockerfile_stages(ROOT / "deploy" / "docker" / "Dockerfile") if name in ("gpu", "cpu")}
    assert set(job["strategy"]["matrix"]["target"]) == targets == {"gpu", "cpu"}
    build = step(job, uses="docker/build-push-action")["with"]
    assert (build["context"], build["file"], build["target"]) == (".", "deploy/docker/Dockerfile", "${{ matrix.target }}")
    assert build["push"] is True and build["sbom"] is True and build["provenance"] is True
    assert build["cache-from"].startswith("type=gha") and build["cache-to"].startswith("type=gha")
    assert build["tags"] == "${{ steps.image.outputs.name }}:${{ steps.version.outputs.version }}-${{ matrix.target }}"
    assert workflow["permissions"]["packages"] == "write"


@pytest.mark.parametrize("ref_type, ref_name, ok", [("tag", f"v{VERSION_IN_PYPROJECT}", True), ("tag", "v9.9.9", False),
                                                    ("branch", "main", True)])
def test_the_image_tag_is_the_package_version_and_a_tag_must_match_it(tmp_path: Path, ref_type, ref_name, ok):
    script = step(next(iter(load("image.yml")["jobs"].values())), name="Version from pyproject.toml")["run"]
    output = tmp_path / "output"
    result = run_step(script, {"GITHUB_REF_TYPE": ref_type, "GITHUB_REF_NAME": ref_name, "GITHUB_OUTPUT": str(output)})
    assert (result.returncode == 0) is ok, result.stdout + result.stderr
    if ok:
        assert output.read_text() == f"version={VERSION_IN_PYPROJECT}\n"
    else:
        assert "does not match" in result.stdout


@pytest.mark.parametrize("acr, expected", [("", "ghcr.io/my-org/usf-bios"),
                                           ("myregistry.azurecr.io", "myregistry.azurecr.io/usf-bios")])
def test_the_registry_is_ghcr_unless_an_acr_is_named(tmp_path: Path, acr, expected):
    script = step(next(iter(load("image.yml")["jobs"].values())), name="Image name")["run"]
    output = tmp_path / "output"
    result = run_step(script, {"ACR_LOGIN_SERVER": acr, "GITHUB_REPOSITORY_OWNER": "My-Org", "GITHUB_OUTPUT": str(output)})
    assert result.returncode == 0, result.stderr
    assert output.read_text() == f"name={expected}\n"
