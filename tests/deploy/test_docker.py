"""deploy/docker/Dockerfile: hadolint-clean, the two targets, what each final image runs, and the
.dockerignore that keeps everything but the package out of the build context."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer

from tests.deploy.server import running_server
from tests.deploy.tools import DEPLOY, ROOT, dockerfile_stages, hadolint

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
TARGETS = ("gpu", "cpu")


@pytest.fixture(scope="module")
def stages() -> dict[str, list[tuple[str, str]]]:
    return dockerfile_stages(DOCKERFILE)


def last(stage: list[tuple[str, str]], instruction: str) -> str:
    values = [args for ins, args in stage if ins == instruction]
    assert values, f"no {instruction} in the stage"
    return values[-1]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins, args in stage:
        if ins == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(args))
    return env


def global_args() -> dict[str, str]:
    """ARG defaults before the first FROM."""
    args = {}
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("FROM"):
            break
        if match := re.match(r"ARG (\w+)=(\S+)", line):
            args[match[1]] = match[2]
    return args


def test_the_dockerfile_is_clean_for_hadolint():
    assert hadolint(DOCKERFILE) == []


def test_hadolint_reports_a_faulty_dockerfile(tmp_path: Path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get update && apt-get install -y curl\nCMD curl localhost\n")
    codes = {finding["code"] for finding in hadolint(bad)}
    assert {"DL3007", "DL3008", "DL3025"} <= codes   # :latest, unpinned apt package, CMD not in JSON form


def test_both_targets_exist(stages):
    assert set(TARGETS) <= set(stages)


@pytest.mark.parametrize("target", TARGETS)
def test_each_image_runs_the_server_as_a_non_root_user_on_the_storage_root(stages, target):
    stage = stages[target]
    user = last(stage, "USER").split(":")[0]
    assert user.isdigit() and int(user) != 0, "a numeric non-root user, so that runAsNonRoot can check it"
    assert env_of(stage)["USF_HOME"] == "/mnt/usf-storage"
    if target == "gpu":   # CUDA numbers GPUs as NVML does, whose numbers the scheduler assigns to jobs
        assert env_of(stage)["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert last(stage, "EXPOSE") == "8000"
    assert json.loads(last(stage, "ENTRYPOINT")) == ["usf-bios"]
    assert json.loads(last(stage, "CMD")) == ["serve", "--host", "0.0.0.0"]
    healthcheck = last(stage, "HEALTHCHECK")
    assert "/api/health" in healthcheck and "curl" not in healthcheck


def test_the_entrypoint_and_its_default_command_exist():
    from usf_bios.cli import app

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["usf-bios"] == "usf_bios.cli:app"
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    assert "serve" in commands
    assert "--host" in {opt for param in commands["serve"].params for opt in param.opts}
    assert {"keys"} <= set(commands)   # `usf-bios keys create`: the first admin key in docs/deploy.md


def test_torch_comes_from_the_matching_pytorch_index(stages):
    args = global_args()
    cpu_build = " ".join(a for i, a in stages["cpu-build"] if i == "RUN")
    gpu_build = " ".join(a for i, a in stages["gpu-build"] if i == "RUN")
    assert "download.pytorch.org/whl/cpu" in cpu_build
    assert "download.pytorch.org/whl/${TORCH_CUDA}" in gpu_build and '".[gpu]"' in gpu_build
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "runtime" in args["CUDA_IMAGE"]
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)", args["CUDA_IMAGE"])
    assert cuda and args["TORCH_CUDA"] == f"cu{cuda[1]}{cuda[2]}", "the base's CUDA and torch's CUDA build agree"
    # the images carry the torch the test suite runs on (.ci/run)
    ci_torch = re.search(r"torch==([\d.]+)", (ROOT / ".ci" / "run").read_text())
    assert ci_torch and args["TORCH_VERSION"] == ci_torch[1]
    assert stages["gpu"][0][1] == "gpu-os AS gpu" and stages["gpu-os"][0][1] == "${CUDA_IMAGE} AS gpu-os"


def test_no_secret_is_baked_into_an_image():
    names = re.findall(r"^(?:ARG|ENV)\s+(.+)$", DOCKERFILE.read_text(), re.MULTILINE)
    words = " ".join(names).upper()
    for secret in ("KEY", "TOKEN", "PASSWORD", "SECRET", "DATABASE_URL"):
        assert secret not in words


def test_the_dockerignore_admits_only_what_the_copies_need(stages):
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", "everything is excluded first"
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for stage in stages.values():
        for ins, args in stage:
            if ins == "COPY" and "--from=" not in args:
                copied.update(a.removeprefix("./").rstrip("/") for a in args.split()[:-1])
    assert copied == admitted == {"pyproject.toml", "README.md", "usf_bios"}
    # what pyproject needs to build the wheel is admitted (the readme it names)
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"] in admitted


def healthcheck_command(stages) -> list[str]:
    """The HEALTHCHECK's exec-form command, with this interpreter as `python`."""
    command = json.loads(last(stages["cpu"], "HEALTHCHECK").split(" CMD ", 1)[1])
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def test_the_health_check_command_passes_against_a_running_server_and_fails_without_one(stages, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("USF_")}
    env.update({"USF_HOME": str(tmp_path / "usf"), "HF_HUB_OFFLINE": "1"})
    env.pop("DATABASE_URL", None)
    command = healthcheck_command(stages)
    with running_server(["serve", "--host", "127.0.0.1"], env, tmp_path / "server.log") as port:
        ok = subprocess.run(command, env={**env, "USF_PORT": str(port)}, capture_output=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
    down = subprocess.run(command, env={**env, "USF_PORT": str(port)}, capture_output=True, timeout=30)
    assert down.returncode != 0
