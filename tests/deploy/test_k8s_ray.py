"""deploy/k8s/ray: USF BIOS with its jobs on a KubeRay RayCluster. The kustomization renders; every Kubernetes
resource passes strict validation and the RayCluster passes the KubeRay schema the tests carry (its pod templates
as Kubernetes pod templates), so a misspelt or mistyped field fails here; a head and an autoscaled GPU worker
group; the one shared (ReadWriteMany) volume on every pod at /mnt/usf-storage; the server pointed at the head's
Jobs API (RAY_ADDRESS) and allowed to reach it."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.deploy.test_k8s import MOUNT, SERVER_LABELS, configmap, container, unknown_keys
from tests.deploy.tools import K8S, ManifestError, by_kind, kustomize, one, validate
from usf_bios.settings import Settings

# what KubeRay names and labels (ray-operator/controllers/ray/utils: the head service, the pods' labels)
HEAD_SERVICE = "{cluster}-head-svc"
RAY_LABELS = {"cluster": "ray.io/cluster", "node_type": "ray.io/node-type"}
DASHBOARD_PORT = 8265   # Ray's default dashboard-port, where the Jobs API answers


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return kustomize(K8S / "ray")


def ray_pods(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = cluster["spec"]
    return [("head", spec["headGroupSpec"]["template"]["spec"]),
            *((group["groupName"], group["template"]["spec"]) for group in spec["workerGroupSpecs"])]


def test_every_resource_is_valid_and_the_raycluster_passes_the_kuberay_schema(rendered):
    assert {r["kind"] for r in rendered} >= {"RayCluster", "Deployment", "PersistentVolumeClaim", "ConfigMap",
                                             "StorageClass", "NetworkPolicy"}
    for resource in rendered:
        validate(resource)


@pytest.mark.parametrize("path, value, reason", [
    (("spec", "workerGroupSpecs", 0, "maxReplica"), 4, "maxReplica"),                   # a misspelt field
    (("spec", "enableInTreeAutoscaling"), "true", "enableInTreeAutoscaling"),           # a string for a boolean
    (("spec", "headGroupSpec", "rayStartParams", "num-cpus"), 0, "num-cpus"),           # ray start takes strings
    (("spec", "autoscalerOptions", "upscalingMode"), "Fast", "upscalingMode"),          # not one of its values
    (("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "imagee"), "x", "imagee"),   # in a pod
    (("spec", "headGroupSpec", "template", "spec", "volumes", 0, "persistentVolumeClaim", "claim"), "x", "claim"),
])
def test_the_validation_rejects_a_broken_raycluster(rendered, path, value, reason):
    broken = copy.deepcopy(one(rendered, "RayCluster"))
    target = broken
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ManifestError, match=reason):
        validate(broken)


def test_a_head_and_an_autoscaled_gpu_worker_group(rendered):
    cluster = one(rendered, "RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] >= 60
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    [gpu] = spec["workerGroupSpecs"]
    assert 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] and gpu["maxReplicas"] >= 2
    worker = gpu["template"]["spec"]
    limits = worker["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] >= 1 and worker["nodeSelector"] == {"kubernetes.azure.com/agentpool": "gpu"}
    assert {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"} in worker["tolerations"]
    assert cluster["metadata"]["namespace"] == one(rendered, "Deployment")["metadata"]["namespace"]
    images = {pod["containers"][0]["image"] for _, pod in ray_pods(cluster)}
    assert len(images) == 1 and images.pop().endswith("-gpu-ray"), "one image (one Python, one Ray) on every node"
    for _, pod in ray_pods(cluster):
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        assert "command" not in pod["containers"][0], "KubeRay supplies the `ray start` command"


def test_the_server_and_every_ray_pod_mount_one_shared_volume(rendered):
    claim = one(rendered, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    storage_class = one(rendered, "StorageClass")
    assert claim["spec"]["storageClassName"] == storage_class["metadata"]["name"]
    assert storage_class["provisioner"] == "file.csi.azure.com" and storage_class["parameters"]["protocol"] == "nfs"
    pods = [("server", one(rendered, "Deployment")["spec"]["template"]["spec"]), *ray_pods(one(rendered, "RayCluster"))]
    for name, pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert volumes[mounts[MOUNT]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], name


def test_the_server_runs_no_job_itself_and_points_at_the_head(rendered):
    data = configmap(rendered)
    assert unknown_keys(data) == []
    settings = Settings.model_validate(data)
    cluster = one(rendered, "RayCluster")
    assert settings.executor == "ray"
    assert settings.ray_address == f"http://{HEAD_SERVICE.format(cluster=cluster['metadata']['name'])}:{DASHBOARD_PORT}"
    assert settings.usf_home.as_posix() == MOUNT and settings.database_url is not None
    main = container(rendered)
    assert "nvidia.com/gpu" not in main["resources"]["limits"] and main["image"].endswith("-cpu-ray")
    env = {e["name"]: e for e in main.get("env", [])}
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "usf-bios-database", "PostgreSQL, not SQLite on NFS"
    assert "DATABASE_URL" not in data


def test_the_network_policy_lets_the_server_reach_the_jobs_api_of_the_head(rendered):
    cluster = one(rendered, "RayCluster")["metadata"]["name"]
    head_labels = {RAY_LABELS["cluster"]: cluster, RAY_LABELS["node_type"]: "head"}
    reaching = []
    for policy in by_kind(rendered, "NetworkPolicy"):
        spec = policy["spec"]
        if not spec["podSelector"]["matchLabels"].items() <= SERVER_LABELS.items():
            continue
        for rule in spec.get("egress", []):
            to_head = any(peer.get("podSelector", {}).get("matchLabels", {}).items() <= head_labels.items()
                          and "podSelector" in peer for peer in rule.get("to", []))
            if to_head and {"protocol": "TCP", "port": DASHBOARD_PORT} in rule["ports"]:
                reaching.append(policy["metadata"]["name"])
    assert reaching == ["usf-bios-ray"]
