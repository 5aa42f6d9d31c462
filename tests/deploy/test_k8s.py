"""deploy/k8s: every kustomization renders (kubectl kustomize) and every resource passes strict schema
validation for KUBERNETES_VERSION; the ConfigMap holds real settings with paths on the volume; the overlays,
the Deployment, the Ingress, the NetworkPolicy and the download Job do what docs/deploy.md says."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import tomllib
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.deploy.server import running_server
from tests.deploy.tools import K8S, ROOT, ManifestError, by_kind, kustomize, one, tool, validate
from usf_bios.settings import Settings

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
KUSTOMIZATIONS = ["base", *(f"overlays/{o}" for o in OVERLAYS), "jobs/download-models", "examples/my-cluster"]
MOUNT = "/mnt/usf-storage"
SERVER_LABELS = {"app.kubernetes.io/name": "usf-bios", "app.kubernetes.io/component": "server"}

# ConfigMap keys that are not USF BIOS settings but variables of the processes in the pod, each for a reason.
PROCESS_VARIABLES = {
    # The root file system is read-only; Python libraries (Triton's kernel cache, torch, pip) write under ~.
    "HOME": "a writable home on the /tmp emptyDir",
}
# Not in the ConfigMap on purpose: the executor sets it for every job (usf_bios/control/executors/local.py) from
# the GPUs NVML shows the pod, which are the ones its nvidia.com/gpu limit allocates. (CUDA_DEVICE_ORDER, which
# makes CUDA number GPUs as NVML does, is set in the gpu image.)
NOT_IN_CONFIGMAP = {"CUDA_VISIBLE_DEVICES"}


def setting_names() -> set[str]:
    return {field.validation_alias for field in Settings.model_fields.values()}  # type: ignore[misc]


def path_setting_names() -> set[str]:
    return {f.validation_alias for f in Settings.model_fields.values()  # type: ignore[misc]
            if "Path" in str(f.annotation) and "tuple" not in str(f.annotation)}


def unknown_keys(data: dict[str, str]) -> list[str]:
    return sorted(set(data) - setting_names() - set(PROCESS_VARIABLES))


def under(path: str, mount: str) -> bool:
    return PurePosixPath(path).is_relative_to(mount) and ".." not in PurePosixPath(path).parts


def paths_off_the_volume(data: dict[str, str], mount: str) -> list[str]:
    """Path settings (given or derived from USF_HOME) and the SQLite file that do not lie under the mount."""
    off = [key for key in sorted(path_setting_names() & set(data)) if not under(data[key], mount)]
    settings = Settings.model_validate(data)
    for name in ("usf_home", "output_path", "checkpoint_path", "log_path", "model_path", "hf_home",
                 "transformers_cache", "modelscope_cache"):
        if not under(str(getattr(settings, name)), mount):
            off.append(name)
    url = settings.database_url or ""
    if url.startswith("sqlite:///") and not under(url[len("sqlite:///"):], mount):
        off.append("DATABASE_URL")
    return off


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize(K8S / name) for name in KUSTOMIZATIONS}


def container(resources: list[dict[str, Any]], kind: str = "Deployment") -> dict[str, Any]:
    return one(resources, kind)["spec"]["template"]["spec"]["containers"][0]


def configmap(resources: list[dict[str, Any]]) -> dict[str, str]:
    return one(resources, "ConfigMap", "usf-bios-config")["data"]


# --- rendering and schemas ----------------------------------------------------------------------------------

def test_there_are_four_overlays_of_hardware_and_job_store():
    assert OVERLAYS == ["cpu-postgres", "cpu-sqlite", "gpu-postgres", "gpu-sqlite"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_kustomization_renders_to_valid_resources(rendered, name):
    assert rendered[name]
    for resource in rendered[name]:
        validate(resource)


def test_the_validation_rejects_broken_manifests(rendered):
    deployment = one(rendered["overlays/gpu-sqlite"], "Deployment")
    validate(deployment)
    unknown_field = copy.deepcopy(deployment)
    unknown_field["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "one"
    unknown_api = copy.deepcopy(deployment)
    unknown_api["apiVersion"] = "apps/v1beta9"
    for broken, reason in ((unknown_field, "imagePullPolicyy"), (wrong_type, "replicas"), (unknown_api, "schema")):
        with pytest.raises(ManifestError, match=reason):
            validate(broken)


def test_the_example_operator_overlay_renames_the_image_and_the_host(rendered):
    resources = rendered["examples/my-cluster"]
    assert container(resources)["image"] == f"myregistry.azurecr.io/usf-bios:{VERSION}-gpu"
    ingress = one(resources, "Ingress")["spec"]
    assert ingress["rules"][0]["host"] == ingress["tls"][0]["hosts"][0] == "usf.example.org"
    assert container(resources)["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_kustomize_errors_are_reported(tmp_path: Path):
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    with pytest.raises(ManifestError, match="missing.yaml"):
        kustomize(tmp_path)


def test_the_secret_templates_are_valid_and_hold_only_placeholders():
    templates = sorted((K8S / "secrets").glob("*.example.yaml"))
    assert {t.name for t in templates} == {"database.example.yaml", "hf-token.example.yaml"}
    for template in templates:
        secret = yaml.safe_load(template.read_text())
        validate(secret)
        assert secret["stringData"] and all("CHANGE-ME" in v for v in secret["stringData"].values())


# --- the ConfigMap ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_configmap_key_is_a_setting_or_a_documented_process_variable(rendered, overlay):
    data = configmap(rendered[f"overlays/{overlay}"])
    assert unknown_keys(data) == []
    assert not NOT_IN_CONFIGMAP & set(data)
    assert {"USF_HOME", "OUTPUT_PATH", "CHECKPOINT_PATH", "LOG_PATH", "HF_HOME", "TRANSFORMERS_CACHE",
            "SUPPORTED_MODEL_SOURCES", "USF_MODEL_PATH", "USF_MAX_UPLOAD_MB", "USF_HOST"} <= set(data)
    settings = Settings.model_validate(data)   # the values parse as the server will read them
    assert settings.usf_home == Path(MOUNT) and settings.host == "0.0.0.0"


def test_a_misspelt_key_is_caught():
    assert unknown_keys({"USF_HOME": MOUNT, "USF_MAX_UPLOADS_MB": "10", "HOME": "/tmp"}) == ["USF_MAX_UPLOADS_MB"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_path_lies_on_the_volume(rendered, overlay):
    resources = rendered[f"overlays/{overlay}"]
    spec = one(resources, "Deployment")["spec"]["template"]["spec"]
    claim = next(v for v in spec["volumes"] if "persistentVolumeClaim" in v)
    mount = next(m["mountPath"] for m in spec["containers"][0]["volumeMounts"] if m["name"] == claim["name"])
    assert mount == MOUNT
    data = configmap(resources)
    assert path_setting_names() & set(data) >= {"OUTPUT_PATH", "CHECKPOINT_PATH", "LOG_PATH", "HF_HOME"}
    assert paths_off_the_volume(data, mount) == []


def test_a_path_off_the_volume_is_caught():
    data = {"USF_HOME": MOUNT, "LOG_PATH": "/var/log/usf", "DATABASE_URL": "sqlite:////var/lib/usf.db"}
    assert paths_off_the_volume(data, MOUNT) == ["LOG_PATH", "log_path", "DATABASE_URL"]
    assert paths_off_the_volume({"USF_HOME": MOUNT + "/../etc"}, MOUNT)


# --- what each overlay adds -----------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_is_its_hardware_and_its_job_store(rendered, overlay):
    hardware, store = overlay.split("-")
    resources = rendered[f"overlays/{overlay}"]
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    main = pod["containers"][0]
    assert main["image"].endswith(f"/usf-bios:{VERSION}-{hardware}"), "image.yml's tag: VERSION-target"
    limits, requests = main["resources"]["limits"], main["resources"]["requests"]
    assert {"cpu", "memory"} <= set(requests) and {"cpu", "memory"} <= set(limits)
    if hardware == "gpu":
        assert limits["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] == {"kubernetes.azure.com/agentpool": "gpu"}
        assert {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"} in pod["tolerations"]
    else:
        assert "nvidia.com/gpu" not in limits and "tolerations" not in pod and "nodeSelector" not in pod
    env = {e["name"]: e for e in main.get("env", [])}
    data = configmap(resources)
    if store == "sqlite":
        assert data["DATABASE_URL"] == f"sqlite:///{MOUNT}/data/usf.db" and "DATABASE_URL" not in env
    else:
        assert "DATABASE_URL" not in data
        assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "usf-bios-database", "key": "DATABASE_URL"}
        assert not by_kind(resources, "Secret"), "the real Secret is created by hand, never overwritten by apply"
        egress = one(resources, "NetworkPolicy", "usf-bios-postgres")["spec"]["egress"]
        assert {"protocol": "TCP", "port": 5432} in egress[0]["ports"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_deployment_is_one_locked_down_pod_on_the_volume(rendered, overlay):
    resources = rendered[f"overlays/{overlay}"]
    deployment = one(resources, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    main = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    assert f"USER {pod['securityContext']['runAsUser']}:" in dockerfile, "the image's user"
    security = main["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "a writable /tmp under the read-only root"
    assert volumes[mounts[MOUNT]]["persistentVolumeClaim"]["claimName"] == one(resources, "PersistentVolumeClaim")["metadata"]["name"]
    assert configmap(resources)["HOME"] == "/tmp"
    port = next(p for p in main["ports"] if p["name"] == "http")["containerPort"]
    assert port == int(configmap(resources)["USF_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["httpGet"] == {"path": "/api/health", "port": "http"}
    assert main["args"] == ["serve", "--host", "0.0.0.0"]


def test_the_volume_is_a_one_tebibyte_premium_ssd(rendered):
    resources = rendered["overlays/gpu-sqlite"]
    claim = one(resources, "PersistentVolumeClaim")
    storage_class = one(resources, "StorageClass")
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Ti"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["storageClassName"] == storage_class["metadata"]["name"]
    assert storage_class["provisioner"] == "disk.csi.azure.com"
    assert storage_class["parameters"]["skuName"] == "Premium_LRS"
    assert storage_class["reclaimPolicy"] == "Retain"


def test_the_ingress_takes_the_largest_upload_and_keeps_live_streams_open(rendered):
    from usf_bios.api.uploads import MULTIPART_OVERHEAD

    resources = rendered["overlays/gpu-sqlite"]
    ingress = one(resources, "Ingress")
    notes = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    body = re.fullmatch(r"(\d+)m", notes[prefix + "proxy-body-size"])
    max_upload_mb = int(configmap(resources)["USF_MAX_UPLOAD_MB"])
    assert body and int(body[1]) == max_upload_mb + 1
    assert int(body[1]) * 2**20 >= max_upload_mb * 2**20 + MULTIPART_OVERHEAD, "the server, not nginx, answers 413"
    assert notes[prefix + "proxy-buffering"] == "off" and notes[prefix + "proxy-request-buffering"] == "off"
    assert int(notes[prefix + "proxy-read-timeout"]) >= 3600 and int(notes[prefix + "proxy-send-timeout"]) >= 3600
    rule = ingress["spec"]["rules"][0]
    assert rule["host"] in ingress["spec"]["tls"][0]["hosts"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    service = one(resources, "Service")
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    assert service["spec"]["selector"] == SERVER_LABELS


def test_the_network_policy_admits_the_ingress_controller_and_leaves_the_download_job_alone(rendered):
    resources = rendered["overlays/gpu-postgres"]
    pod_labels = one(resources, "Deployment")["spec"]["template"]["metadata"]["labels"]
    job_labels = one(rendered["jobs/download-models"], "Job")["spec"]["template"]["metadata"]["labels"]
    port = container(resources)["ports"][0]["containerPort"]
    for policy in by_kind(resources, "NetworkPolicy"):
        selector = policy["spec"]["podSelector"]["matchLabels"]
        assert selector.items() <= pod_labels.items()
        assert not selector.items() <= job_labels.items(), "the Job needs the internet; the server does not"
    main = one(resources, "NetworkPolicy", "usf-bios")["spec"]
    assert main["ingress"][0]["ports"] == [{"protocol": "TCP", "port": port}]
    assert {p["port"] for rule in main["egress"] for p in rule["ports"]} == {53}


# --- the model download Job -----------------------------------------------------------------------------------

def test_the_download_job_writes_org_model_folders_where_the_server_looks(rendered, tmp_path: Path):
    job = one(rendered["jobs/download-models"], "Job")
    pod = job["spec"]["template"]["spec"]
    main = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert env["USF_MODEL_PATH"] == configmap(rendered["overlays/gpu-sqlite"])["USF_MODEL_PATH"]
    mount = next(m["mountPath"] for m in main["volumeMounts"] if m["name"] == "storage")
    assert mount == MOUNT and under(env["USF_MODEL_PATH"], mount)
    claim = next(v for v in pod["volumes"] if v["name"] == "storage")["persistentVolumeClaim"]["claimName"]
    assert claim == one(rendered["overlays/gpu-sqlite"], "PersistentVolumeClaim")["metadata"]["name"]
    affinity = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert affinity["labelSelector"]["matchLabels"] == SERVER_LABELS, "next to the pod that has the RWO disk"
    # the script, with a stand-in `hf` that records its arguments
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "hf").write_text('#!/bin/sh\necho "$@" >> "$CALLS"\n')
    (bin_dir / "hf").chmod(0o755)
    models = tmp_path / "models"
    run_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CALLS": str(tmp_path / "calls"), "USF_MODEL_PATH": str(models),
               "MODELS": "Qwen/Qwen2.5-7B-Instruct meta-llama/Llama-3.1-8B-Instruct"}
    result = subprocess.run([*main["command"], main["args"][0]], env=run_env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "calls").read_text().splitlines() == [
        f"download Qwen/Qwen2.5-7B-Instruct --local-dir {models}/Qwen--Qwen2.5-7B-Instruct",
        f"download meta-llama/Llama-3.1-8B-Instruct --local-dir {models}/meta-llama--Llama-3.1-8B-Instruct"]
    # …and the real `hf` (huggingface_hub, in the image with transformers) takes those arguments
    help_text = subprocess.run([tool("hf"), "download", "--help"], capture_output=True, text=True, timeout=60)
    assert help_text.returncode == 0 and "--local-dir" in help_text.stdout


# --- the server with the ConfigMap's environment --------------------------------------------------------------

def test_the_server_starts_with_the_configmap_and_the_first_admin_key_is_made_with_the_cli(rendered, tmp_path: Path):
    """The sqlite overlay's environment with the volume moved to a temporary folder; bound to loopback here."""
    root = tmp_path / "usf-storage"
    data = {k: v.replace(MOUNT, str(root)) for k, v in configmap(rendered["overlays/gpu-sqlite"]).items()}
    env = {k: v for k, v in os.environ.items() if k not in setting_names()}
    env.update(data, HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    args = container(rendered["overlays/gpu-sqlite"])["args"]
    assert args[:2] == ["serve", "--host"]
    with running_server([*args[:2], "127.0.0.1"], env, tmp_path / "server.log") as port:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as response:
            assert response.status == 200
        key = subprocess.run([tool("usf-bios"), "keys", "create", "--name", "admin", "--admin"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert key.returncode == 0, key.stderr
        assert key.stdout.strip().splitlines()[-1]
    assert (root / "data" / "usf.db").is_file()
    assert {p.name for p in (root / "data").iterdir()} >= {"output", "checkpoints", "logs"}
