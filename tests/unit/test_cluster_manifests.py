"""cluster/: the KubeRay manifests validate against the KubeRay v1.7.0 CRDs (vendored in tests/data/kuberay),
are what cluster/render.py writes, and keep the security properties: non-root, no privilege escalation,
read-only root filesystems, requests and limits on every container, the dashboard inside the cluster,
images pinned by version, the Hugging Face token from a Secret, shared storage for checkpoints and caches."""

from __future__ import annotations

import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from hdpo_ray.config import load_config
from tests.helpers import REPO

CLUSTER = REPO / "cluster"
CRDS = Path(__file__).parents[1] / "data" / "kuberay"
RAY_MANIFESTS = ("raycluster.yaml", "rayjob-train.yaml", "rayjob-sweep.yaml")


def _render_module():
    spec = importlib.util.spec_from_file_location("render", CLUSTER / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _manifest(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@lru_cache(maxsize=2)
def _schema(kind: str) -> dict:
    crd = yaml.load(
        (CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    )
    assert crd["spec"]["names"]["kind"] == kind
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def _cluster_spec(manifest: dict) -> dict:
    return manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]


def _pod_specs(manifest: dict) -> list[dict]:
    spec = _cluster_spec(manifest)
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    return pods + ([manifest["spec"]["submitterPodTemplate"]["spec"]] if manifest["kind"] == "RayJob" else [])


def _containers(manifest: dict) -> list[dict]:
    return [c for pod in _pod_specs(manifest) for c in pod["containers"]] + [
        _cluster_spec(manifest)["autoscalerOptions"]
    ]


def test_committed_manifests_are_what_render_writes():
    render = _render_module()
    for name, manifest in render.manifests().items():
        assert (CLUSTER / name).read_text() == render.render(name, manifest), (
            f"cluster/{name} is stale: run python cluster/render.py"
        )


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_manifest_validates_against_the_kuberay_crd(name):
    manifest = _manifest(name)
    assert manifest["apiVersion"] == "ray.io/v1"
    jsonschema.Draft7Validator(_schema(manifest["kind"])).validate(manifest)


def test_the_validation_catches_a_broken_manifest():
    """The schema check can fail: a worker group without its required groupName, a replica count of the wrong type."""
    schema = _schema("RayCluster")
    broken = _manifest("raycluster.yaml")
    del broken["spec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError, match="groupName"):
        jsonschema.Draft7Validator(schema).validate(broken)
    broken = _manifest("raycluster.yaml")
    broken["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(broken)


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_every_container_is_locked_down_and_sized(name):
    manifest = _manifest(name)
    for pod in _pod_specs(manifest):
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    for container in _containers(manifest):
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True and security["allowPrivilegeEscalation"] is False, container.get(
            "name", "autoscaler"
        )
        assert security["readOnlyRootFilesystem"] is True and security["capabilities"]["drop"] == ["ALL"]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert {"cpu", "memory"} <= set(requests) and {"cpu", "memory"} <= set(limits)
        if "image" in container:  # the autoscaler's image defaults to the head's
            assert re.search(r":\d+\.\d+\.\d+-ray2\.60\.0", container["image"]) and not container["image"].endswith(
                ":latest"
            )


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_cluster_shape_storage_and_secrets(name):
    manifest = _manifest(name)
    spec = _cluster_spec(manifest)
    head = spec["headGroupSpec"]
    assert spec["rayVersion"] == "2.60.0" and head["serviceType"] == "ClusterIP" and head["enableIngress"] is False
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"train-gpu", "reference-gpu"} and spec["enableInTreeAutoscaling"] is True
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]
        assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    for pod in _pod_specs(manifest)[:-1] if manifest["kind"] == "RayJob" else _pod_specs(manifest):
        main = pod["containers"][0]
        assert {"name": "shared", "mountPath": "/mnt/shared"} in main["volumeMounts"]
        assert {"name": "shared", "persistentVolumeClaim": {"claimName": "hdpo-shared"}} in pod["volumes"]
        token = next(e for e in main["env"] if e["name"] == "HF_TOKEN")
        assert token["valueFrom"]["secretKeyRef"]["name"] == "hf-token"  # never a literal value
        # Ray's only writable place besides the volumes
        assert any(m["mountPath"] == "/tmp" for m in main["volumeMounts"])
    assert _manifest("storage.yaml")["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("name, command", [("rayjob-train.yaml", "train"), ("rayjob-sweep.yaml", "sweep")])
def test_rayjobs_run_the_jobs_configs_and_clean_up(name, command):
    spec = _manifest(name)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    program, subcommand, flag, config_path, *overrides = spec["entrypoint"].split()
    assert (program, subcommand, flag) == ("hdpo-ray", command, "--config")
    in_repo = REPO / Path(config_path).relative_to("/home/ray/hdpo-ray")  # the Dockerfile copies the repository there
    config = load_config(str(in_repo), overrides)
    assert config.train.use_gpu and config.output_dir.startswith("/mnt/shared/")


def test_the_image_leaves_out_git_runs_and_checkpoints():
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", "outputs/", "checkpoints/", "tests/"} <= ignored
    # the build context is the repository root
    assert "COPY --chown=1000:100 . ." in (REPO / "cluster" / "Dockerfile").read_text()


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayjob-sweep.yaml"])
def test_the_job_waits_for_the_autoscaler_and_fits_the_groups_at_full_size(name):
    """The GPU groups start at 0 nodes: the job must ask the autoscaler and wait (not refuse), and what it asks
    for must fit the groups at maxReplicas, each actor on the group that offers its custom resource."""
    from hdpo_ray.capacity import ResourceError, check_fits
    from hdpo_ray.train.trainer import training_phases

    manifest = _manifest(name)
    spec = manifest["spec"]
    _, command, _, config_path, *overrides = spec["entrypoint"].split()
    config = load_config(str(REPO / Path(config_path).relative_to("/home/ray/hdpo-ray")), overrides)
    assert config.cluster.autoscaling == "on" and config.cluster.wait_for_resources_s >= 1200

    def cluster_at(replicas: str) -> dict[str, float]:
        total: dict[str, float] = {}
        for group in _cluster_spec(manifest)["workerGroupSpecs"]:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            node = {"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])} | json.loads(
                json.loads(group["rayStartParams"]["resources"])
            )
            for resource, amount in node.items():
                total[resource] = total.get(resource, 0.0) + amount * group[replicas]
        return total

    phases = training_phases(config, stream=command == "train")
    check_fits(phases, cluster_at("maxReplicas"))
    with pytest.raises(ResourceError, match="need 33 CPU, but the cluster has 0"):
        check_fits(phases, cluster_at("minReplicas"))
    assert set(config.train.resources_per_worker) == {"train-gpu"} and set(config.reference.resources) == set(
        config.eval.resources
    ) == {"reference-gpu"}
