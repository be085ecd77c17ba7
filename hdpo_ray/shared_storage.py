"""On several nodes, the paths a run shares between processes must be the same storage on every node.

Ray Train's workers write checkpoints that the driver and a restored worker on another node read; the
reference pool writes the cache that every training worker reads; a sweep's trials write their results
where the driver reads them. A local path that is a different disk on each node loses them silently,
so before such a run starts, a marker file written here is looked for from every other alive node.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from hdpo_ray.capacity import ResourceError
from hdpo_ray.config import Config, is_uri

MARKER_PREFIX = ".hdpo-ray-shared-"


def local_paths(paths: dict[str, str | None]) -> dict[str, str]:
    """{config key: path} -> the local ones, absolute (URIs are shared by definition)."""
    return {key: os.path.abspath(os.path.expanduser(path)) for key, path in paths.items() if path and not is_uri(path)}


def run_paths(config: Config, *, sweep: bool = False) -> dict[str, str | None]:
    """The paths a run shares across nodes: checkpoints and the reference cache; for a sweep also its
    output_dir, where each trial (on any node) writes its results."""
    if sweep:  # each trial checkpoints under the sweep's output_dir unless train.storage_path says otherwise
        return {
            "train.storage_path": config.train.storage_path,
            "reference.cache_dir": config.reference.cache_dir,
            "output_dir": config.output_dir,
        }
    storage = config.train.storage_path or os.path.join(config.output_dir, "checkpoints")
    return {"train.storage_path": storage, "reference.cache_dir": config.reference.cache_dir}


def check_shared(paths: dict[str, str | None]) -> None:
    """Raise ResourceError naming the first local path that an alive node other than this one cannot see."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    local = local_paths(paths)
    if not others or not local:
        return
    markers = {}
    for key, path in local.items():
        Path(path).mkdir(parents=True, exist_ok=True)
        markers[key] = Path(path, f"{MARKER_PREFIX}{uuid.uuid4().hex}")
        markers[key].write_text("written by the driver; read from every node, then removed\n")
    looks = {_sees_on(node["NodeID"]).remote([str(m) for m in markers.values()]): node for node in others}
    try:
        # a node going away does not answer: not checked
        answered, _ = ray.wait(list(looks), num_returns=len(looks), timeout=60)
        seen = {ref: ray.get(ref) for ref in answered}
    finally:
        for marker in markers.values():
            marker.unlink(missing_ok=True)
    for ref, visible in seen.items():
        node = looks[ref]
        for (key, path), ok in zip(local.items(), visible, strict=True):
            if not ok:
                raise ResourceError(
                    f"{key} is {path}, a local path that node {node['NodeManagerAddress']} ({node['NodeID'][:8]}) does "
                    "not see: a run on several nodes needs it on shared storage (the same volume mounted at that path "
                    f"on every node) or a URI (s3://, gs://); set {key}"
                )


def _sees_on(node_id: str):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.remote(_sees).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
    )


def _sees(markers: list[str]) -> list[bool]:
    return [os.path.exists(m) for m in markers]
