"""Writes the KubeRay manifests in cluster/ from one cluster description: `python cluster/render.py`.

The RayCluster and the two RayJobs (training, alpha sweep) carry the same cluster spec; generating
them keeps them from drifting apart, and tests/unit/test_cluster_manifests.py checks that the
committed YAML equals this script's output, validates it against the KubeRay v1.7.0 CRDs and checks
the security properties (non-root, no privilege escalation, read-only root filesystems, requests and
limits on every container, the dashboard kept inside the cluster).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

RAY_VERSION = "2.60.0"
# Built from cluster/Dockerfile and pushed to your registry; pin a version tag (or a digest), never :latest.
IMAGE = "ghcr.io/your-org/hdpo-ray:0.1.0-ray2.60.0-py311-gpu"
RAY_UID = 1000  # the `ray` user of the rayproject images the Dockerfile builds on
SHARED_CLAIM = "hdpo-shared"  # cluster/storage.yaml: checkpoints, reference cache, outputs, the HF cache
SHARED_MOUNT = "/mnt/shared"
HF_TOKEN_SECRET = "hf-token"  # kubectl create secret generic hf-token --from-literal=token=hf_...
APP_DIR = "/home/ray/hdpo-ray"  # where the Dockerfile copies this repository (jobs/ included)
JOB_CONFIG = f"{APP_DIR}/jobs/zephyr-7b-hdpo.yaml"  # the same job file as `ray job submit` and a laptop head
HERE = Path(__file__).parent


def container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RAY_UID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def container(name: str, *, cpu: int, memory: str, gpus: int = 0, command: list[str] | None = None) -> dict[str, Any]:
    """One container: the pinned image, requests = limits, non-root with a read-only root filesystem.

    Ray writes only under /tmp (sessions, logs, spilling), the Hugging Face cache lives on the shared
    volume, and nothing is installed at run time (the image holds hdpo-ray), so the root can be read-only.
    """
    resources = {"cpu": str(cpu), "memory": memory} | ({"nvidia.com/gpu": str(gpus)} if gpus else {})
    spec = {
        "name": name,
        "image": IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "securityContext": container_security(),
        "env": [
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": HF_TOKEN_SECRET, "key": "token", "optional": True}},
            },
            {"name": "HF_HOME", "value": f"{SHARED_MOUNT}/hf-cache"},
            {"name": "DS_ACCELERATOR", "value": "cuda" if gpus else "cpu"},
        ],
        "volumeMounts": [
            {"name": "shared", "mountPath": SHARED_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "home-cache", "mountPath": "/home/ray/.cache"},
        ],
    }
    if command:
        spec["command"] = command
    return spec


def pod_template(main: dict[str, Any], *, gpus: bool, shm: str) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RAY_UID,
            "fsGroup": 100,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [main],
        "volumes": [
            {"name": "shared", "persistentVolumeClaim": {"claimName": SHARED_CLAIM}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
            {"name": "home-cache", "emptyDir": {}},
        ],
    }
    if gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


def worker_group(name: str, *, replicas: tuple[int, int], gpus: int, cpu: int, memory: str) -> dict[str, Any]:
    """A GPU group whose nodes also offer a custom resource named after the group, one unit per GPU: the job
    file's train.resources_per_worker / reference.resources / eval.resources name it, so the autoscaler
    knows which group to grow for which actors, and an 8-GPU training node never hosts reference actors."""
    return {
        "groupName": name,
        "minReplicas": replicas[0],
        "maxReplicas": replicas[1],
        "replicas": replicas[0],
        "rayStartParams": {
            "resources": json.dumps(json.dumps({name: gpus}))
        },  # KubeRay passes it to `ray start --resources` as one quoted string
        "template": pod_template(container("ray-worker", cpu=cpu, memory=memory, gpus=gpus), gpus=True, shm="64Gi"),
    }


def cluster_spec() -> dict[str, Any]:
    """A CPU head (no work scheduled on it) and two autoscaled GPU groups: 8-GPU nodes for the DeepSpeed
    workers, 1-GPU nodes for the reference pool and evaluation actors."""
    head = {
        # The dashboard (and job server) listens on the pod's address so that RayJob's submitter can reach it
        # through the head Service; a ClusterIP Service and no Ingress keep it inside the cluster.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "serviceType": "ClusterIP",
        "enableIngress": False,
        "template": pod_template(container("ray-head", cpu=8, memory="32Gi"), gpus=False, shm="8Gi"),
    }
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": 300,
            "imagePullPolicy": "IfNotPresent",
            "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}},
            "securityContext": container_security(),
        },
        "headGroupSpec": head,
        "workerGroupSpecs": [
            worker_group("train-gpu", replicas=(0, 2), gpus=8, cpu=64, memory="512Gi"),
            worker_group("reference-gpu", replicas=(0, 8), gpus=1, cpu=8, memory="64Gi"),
        ],
    }


def submitter_template() -> dict[str, Any]:
    """RayJob's submitter pod (K8sJobMode runs `ray job submit` in it): the same image, small and locked down."""
    submitter = container("ray-job-submitter", cpu=1, memory="1Gi")
    submitter["volumeMounts"] = [{"name": "tmp", "mountPath": "/tmp"}]
    submitter["env"] = [e for e in submitter["env"] if e["name"] != "HF_HOME"]
    template = pod_template(submitter, gpus=False, shm="64Mi")
    template["spec"]["restartPolicy"] = "Never"
    template["spec"]["volumes"] = [{"name": "tmp", "emptyDir": {}}]
    return template


def ray_job(name: str, entrypoint: str, *, hours: int) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "labels": {"app": "hdpo-ray"}},
        "spec": {
            "entrypoint": entrypoint,
            "shutdownAfterJobFinishes": True,  # delete the cluster when the job ends ...
            "ttlSecondsAfterFinished": 600,  # ... 10 minutes later, time to read the logs
            "activeDeadlineSeconds": hours * 3600,
            "backoffLimit": 2,  # a retried job resumes: the same output_dir continues from the latest checkpoint
            "submissionMode": "K8sJobMode",
            "submitterPodTemplate": submitter_template(),
            "rayClusterSpec": cluster_spec(),
        },
    }


def manifests() -> dict[str, dict[str, Any]]:
    """File name -> manifest."""
    return {
        "raycluster.yaml": {
            "apiVersion": "ray.io/v1",
            "kind": "RayCluster",
            "metadata": {"name": "hdpo", "labels": {"app": "hdpo-ray"}},
            "spec": cluster_spec(),
        },
        "rayjob-train.yaml": ray_job("hdpo-train", f"hdpo-ray train --config {JOB_CONFIG}", hours=48),
        "rayjob-sweep.yaml": ray_job(
            "hdpo-sweep",
            f"hdpo-ray sweep --config {JOB_CONFIG} output_dir={SHARED_MOUNT}/hdpo/zephyr-7b-sweep",
            hours=240,
        ),
        "storage.yaml": {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": SHARED_CLAIM, "labels": {"app": "hdpo-ray"}},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "2Ti"}}},
        },
    }


def render(name: str, manifest: dict[str, Any]) -> str:
    return (
        "# Generated by cluster/render.py from one cluster description; edit that, then run "
        f"it.\n{yaml.safe_dump(manifest, sort_keys=False, width=200)}"
    )


if __name__ == "__main__":
    for file_name, manifest in manifests().items():
        (HERE / file_name).write_text(render(file_name, manifest))
        print(f"wrote cluster/{file_name}")
