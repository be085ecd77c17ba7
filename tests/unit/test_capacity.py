"""What a run asks of the cluster: phases of groups, custom resources, label selectors, node-group placement keys."""

from __future__ import annotations

import os

import pytest

from hdpo_ray.capacity import (
    DATA_GROUP,
    AutoscalerReport,
    Group,
    Phase,
    ResourceError,
    check_fits,
    labels_match,
    parse_autoscaler_status,
    placement_options,
    shortfall,
)
from hdpo_ray.config import ConfigError, load_config
from hdpo_ray.shared_storage import local_paths, run_paths
from hdpo_ray.sweep.tuner import concurrent_trials
from hdpo_ray.train.trainer import check_resources, training_phases, worker_group


def _config(*overrides):
    return load_config(None, list(overrides))


def test_a_phase_sums_its_groups_per_resource():
    workers = Group("training workers", 2, {"CPU": 0.5, "trainer": 1.0}, hint="lower train.num_workers")
    assert shortfall(Phase((workers, DATA_GROUP)), {"CPU": 2.0, "trainer": 2.0}) is None  # 2 x 0.5 + 1 = 2 CPU
    assert shortfall(Phase((workers, DATA_GROUP)), {"CPU": 2.0, "trainer": 1.0}) == (
        "training workers (2 x 0.5 CPU, 1 trainer) need 2 trainer, but the cluster has 1; "
        "only nodes started with the custom resource trainer offer it (ray start --resources, a KubeRay group's "
        "rayStartParams)"
    )
    assert shortfall(Phase((workers, DATA_GROUP)), {"CPU": 1.5, "trainer": 2.0}).startswith(
        "training workers (2 x 0.5 CPU, 1 trainer) + Ray Data (1 x 1 CPU) need 2 CPU, but the cluster has 1.5"
    )


def test_label_selectors_need_a_node_with_those_labels():
    pool = Group("reference pool", 1, {"CPU": 1.0}, {"role": "reference"}, "set reference.label_selector")
    nodes = [{"role": "train"}, {"role": "train", "zone": "a"}]
    assert shortfall(Phase((pool,)), {"CPU": 4.0}, nodes) == (
        "reference pool ask for a node labelled role=reference, but no node of the cluster has those labels; set "
        "reference.label_selector"
    )
    assert shortfall(Phase((pool,)), {"CPU": 4.0}, [*nodes, {"role": "reference"}]) is None
    assert shortfall(Phase((pool,)), {"CPU": 4.0}) is None  # no node list: totals only
    assert labels_match({"role": "in(reference, eval)"}, {"role": "train"})  # Ray's operators are left to Ray
    assert not labels_match({"role": "reference", "zone": "a"}, {"role": "reference"})


def test_training_phases_follow_the_reference_mode():
    cached = training_phases(
        _config("train.num_workers=2", "train.cpus_per_worker=1", "reference.num_cpus_per_actor=1")
    )
    assert [[g.name for g in p.groups] for p in cached] == [
        ["training workers", "Ray Data"],
        ["reference pool", "Ray Data"],
    ]
    check_fits(cached, {"CPU": 3.0})  # the reference pass and training take turns
    streaming = training_phases(
        _config(
            "train.num_workers=2",
            "train.cpus_per_worker=1",
            "reference.num_cpus_per_actor=1",
            "reference.cache_dir=null",
        )
    )
    with pytest.raises(
        ResourceError,
        match=(
            r"^reference.cache_dir is null, so the reference pool streams beside the training workers: .* need 4 CPU, "
            r"but the cluster has 3"
        ),
    ):
        check_fits(streaming, {"CPU": 3.0})


def test_placement_keys_reach_the_groups_and_the_actor_options():
    config = _config(
        "train.resources_per_worker={trainer: 1}",
        "train.label_selector.role=train",
        "reference.resources={reference: 0.5}",
        "reference.label_selector.role=ref",
    )
    assert worker_group(config).bundle == {"CPU": 0.5, "GPU": 0.0, "trainer": 1.0} and worker_group(config).labels == {
        "role": "train"
    }
    with pytest.raises(ResourceError, match="need 2 trainer, but the cluster has 0"):
        check_resources(config, {"CPU": 8.0})
    check_resources(config, {"CPU": 8.0, "trainer": 2.0, "reference": 0.5})
    assert placement_options({"reference": 0.5}, {"role": "ref"}) == {
        "resources": {"reference": 0.5},
        "label_selector": {"role": "ref"},
    }
    assert placement_options({}, {}) == {}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "train.resources_per_worker={CPU: 1}",
            "train.resources_per_worker: CPU is not a custom resource: CPUs, GPUs and memory have keys of their own",
        ),
        ("reference.resources={GPU: 1}", "reference.resources: GPU is not a custom resource"),
        ("eval.resources={eval: 0}", "eval.resources: eval must be a positive amount"),
        ("train.placement_strategy=RANDOM", "train.placement_strategy"),
        ("cluster.autoscaling=maybe", "cluster.autoscaling"),
        ("cluster.wait_for_resources_s=0", "cluster.wait_for_resources_s"),
    ],
)
def test_bad_placement_keys_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        _config(override)


def test_concurrent_trials_count_custom_resources():
    config = _config("train.num_workers=1", "train.cpus_per_worker=1", "train.resources_per_worker={trainer: 1}")
    assert concurrent_trials(config, {"CPU": 9.0, "trainer": 2.0}) == 2  # two trainer slots, though 8 CPUs would hold 8
    assert concurrent_trials(config, {"CPU": 2.0, "trainer": 2.0}) == 1  # one CPU stays with Ray Data


def test_starting_nodes_are_launches_and_known_nodes_without_heartbeats():
    """The v1 autoscaler's status as `ray status` reads it: two cpu2 nodes known, one
    heartbeating, one launch queued."""
    status = {
        "time": 1796173240.5,
        "autoscaler_report": {
            "active_nodes": {"ray.head.default": 1, "cpu2": 1},
            "pending_launches": {"gpu8": 1},
            "pending_nodes": [["10.0.0.3", "cpu2", "waiting-for-ssh"]],
            "failed_nodes": [],
            "node_type_mapping": {"10.0.0.1": "ray.head.default", "10.0.0.2": "cpu2", "10.0.0.3": "cpu2"},
        },
    }
    assert parse_autoscaler_status(status) == AutoscalerReport(1796173240.5, {"gpu8": 1, "cpu2": 1}, 0)
    idle = {
        "time": 2.0,
        "autoscaler_report": {
            "active_nodes": {"ray.head.default": 1},
            "pending_launches": {},
            "node_type_mapping": {"10.0.0.1": "ray.head.default"},
        },
    }
    assert parse_autoscaler_status(idle) == AutoscalerReport(2.0, {}, 0)


def test_autoscaler_report_says_what_is_starting():
    assert AutoscalerReport(1.0, {"cpu2": 2}, 0).describe() == "the autoscaler is starting 2 cpu2 node(s)"
    assert AutoscalerReport(1.0, {}, 1).describe() == "the autoscaler is starting no node; 1 failed to start"


def test_shared_paths_are_the_local_ones_made_absolute(tmp_path):
    config = _config(f"output_dir={tmp_path}/run", "reference.cache_dir=s3://bucket/cache")
    assert run_paths(config) == {
        "train.storage_path": f"{tmp_path}/run/checkpoints",
        "reference.cache_dir": "s3://bucket/cache",
    }
    assert run_paths(config, sweep=True) == {
        "train.storage_path": None,
        "reference.cache_dir": "s3://bucket/cache",
        "output_dir": f"{tmp_path}/run",
    }
    # a URI is shared storage
    assert local_paths(run_paths(config)) == {"train.storage_path": f"{tmp_path}/run/checkpoints"}
    assert local_paths({"reference.cache_dir": "~/cache", "x": None}) == {
        "reference.cache_dir": os.path.expanduser("~/cache")
    }
