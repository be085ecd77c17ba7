"""Scale-out on real multi-node Ray, all on this machine: a cluster that autoscales from zero (Ray's real
autoscaler, fake multi-node provider), and a fixed cluster of labelled nodes (ray.cluster_utils.Cluster)
that trains across nodes, loses a node mid-run, and runs a sweep whose trials land on different nodes.

Every run is the session's comparison run (tests/integration/conftest.py: 24 real pairs, 6 held out, the
embedded SFT'd tiny Llama, 2 workers, 3 epochs of 6 steps, a checkpoint every 2 steps) placed on other
clusters, and must end with the numbers of that run on the session's one-node head (the autoscaling runs:
2 steps, no eval split, no checkpoint before the last). The figures printed (-s) go into docs/results.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import free_port, run_cli
from tests.integration.checks import checkpoint_step_so_far, events, last_step, metric_rows, ray_job, submit, wait_for, wait_for_job
from tests.integration.conftest import comparison_args
from tests.integration.multinode import AutoscalingHead, TimedRun, start_fixed_cluster

pytestmark = pytest.mark.slow
QUICK = ["train.max_steps=2", "train.save_steps=0", "data.eval_files=[]"]
TRAIN_ROLE = ["train.label_selector.hdpo-role=train", "reference.label_selector.hdpo-role=reference"]
COMPARED = ("loss", "rewards/margins", "logps/chosen", "grad_norm", "eval/loss")


def assert_same_numbers(rows: list[dict], reference: list[dict], rel: float = 1e-5) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for key in COMPARED:
        assert [r.get(key) for r in rows] == pytest.approx([r.get(key) for r in reference], rel=rel, abs=1e-7), key


def one_line_error(result) -> str:
    """Exit 2 and exactly one error line (Ray's own INFO lines about joining the cluster may precede it), no traceback."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("hdpo-ray: error: ")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


# 1. A cluster that scales from zero, as KubeRay's and `ray up`'s do.
def test_a_cluster_that_scales_from_zero_is_asked_for_its_nodes(tmp_path, pairs):
    # cpu2 and slow serve the runs (the autoscaler may pick either for CPU); only slow offers slow-node.
    node_types = {"cpu2": {"resources": {"CPU": 2}, "max_workers": 2}, "slow": {"resources": {"CPU": 1, "slow-node": 1}, "max_workers": 1}}
    with AutoscalingHead(node_types) as head:
        assert head.worker_nodes() == []  # the head has 0 CPUs: nothing can run yet

        # `hdpo-ray train`: 2 workers x 0.5 CPU beside Ray Data's CPU, then the reference actor beside it: one cpu2 node.
        run = TimedRun(comparison_args(tmp_path / "run", tmp_path / "cache", pairs, *QUICK), head.address, tmp_path / "train.log")
        assert run.wait(600) == 0, run.output[-4000:]
        assert "waiting for the autoscaler" in run.output and "the cluster holds the run after" in run.output, run.output[-4000:]
        nodes = head.worker_nodes()  # launched by the autoscaler: the head was alone (and had no CPU) before
        assert sum(n.resources_total.get("CPU", 0) for n in nodes) >= 2, nodes  # the autoscaler picks the node types
        assert [r["step"] for r in metric_rows(tmp_path / "run") if "loss" in r] == [1, 2]
        print(f"\nautoscaling from zero: {len(nodes)} nodes, the run's resources there after {run.first('the cluster holds the run'):.1f} s, "
              f"first step at {run.first('step 1/2'):.1f} s, done at {run.lines[-1][0]:.1f} s")  # fmt: skip

        # `ray job submit` of the same training, to the same cluster's job server, as under KubeRay: the package is
        # installed on every node (the image), so no working_dir (the fake nodes share one session directory,
        # and each node's runtime-env agent would delete the others' unpacked working_dir).
        job_env = ("--runtime-env-json", json.dumps({"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}}))
        submit(head.dashboard, "hdpo-autoscaled", comparison_args(tmp_path / "job", tmp_path / "cache", pairs, *QUICK), job_env)
        assert wait_for_job(head.dashboard, "hdpo-autoscaled", timeout=600) == "SUCCEEDED", ray_job(head.dashboard, "logs", "hdpo-autoscaled").stdout[-4000:]
        assert json.loads((tmp_path / "job" / "run.json").read_text())["status"] == "finished"

        # A resource no node type offers: refused once the autoscaler has looked, not after the whole wait.
        impossible = run_cli(comparison_args(tmp_path / "tpu", tmp_path / "cache", pairs, "train.resources_per_worker={tpu-slice: 1}", *QUICK), head.address, timeout=300)
        assert "the autoscaler starts no node for this run: training workers (2 x 0.5 CPU, 1 tpu-slice) need 2 tpu-slice, but the cluster has 0; only nodes started with the custom resource tpu-slice" in one_line_error(impossible)

        # A wait that runs out (cluster.wait_for_resources_s) before the autoscaler has looked five times: one line.
        # (Two slow-node while slow is at most one node: the autoscaler would also give up, but only after 5 updates.)
        late = run_cli(comparison_args(tmp_path / "late", tmp_path / "cache", pairs, "train.resources_per_worker={slow-node: 1}", "cluster.wait_for_resources_s=1", *QUICK), head.address, timeout=300)
        assert "waited 1 s (cluster.wait_for_resources_s) and the cluster still cannot hold the run: training workers (2 x 0.5 CPU, 1 slow-node) need 2 slow-node, but the cluster has " in one_line_error(late)


@pytest.fixture(scope="module")
def fixed_cluster(ray_address):
    """A head (1 CPU, for Ray Data) and three 1-CPU nodes: two labelled for training, one for the reference pool.

    After the session's head (ray_address), whose start runs `ray stop --force`, which would end this cluster too."""
    from ray._common.utils import get_ray_address_file

    # Cluster records its head as "the current cluster" of the machine, where Ray (the State API in Ray Train's
    # placement-group cleaner, among others) looks for an address: put the session head's record back after.
    record = Path(get_ray_address_file(None))
    saved = record.read_text() if record.exists() else None
    dashboard_port = free_port()
    cluster = start_fixed_cluster(dashboard_port)
    try:
        for role in ("train", "train", "reference"):
            cluster.add_node(num_cpus=1, labels={"hdpo-role": role})
        cluster.wait_for_nodes()
        yield cluster, f"http://127.0.0.1:{dashboard_port}"
    finally:
        cluster.shutdown()
        if saved is None:
            record.unlink(missing_ok=True)
        else:
            record.write_text(saved)


def actors(dashboard: str, class_name: str) -> dict[str, str]:
    """actor id -> node id, for every actor of that class the cluster has had."""
    from ray.util.state import list_actors

    return {a.actor_id: a.node_id for a in list_actors(address=dashboard, filters=[("class_name", "=", class_name)], limit=10_000)}


def node_roles(dashboard: str) -> dict[str, str]:
    from ray.util.state import list_nodes

    return {n.node_id: n.labels.get("hdpo-role") for n in list_nodes(address=dashboard, limit=1000, detail=True)}


@pytest.fixture(scope="module")
def multi_node_run(fixed_cluster, pairs, tmp_path_factory) -> tuple[Path, Path]:
    """The same run on the fixed cluster: workers (1 CPU each) on the two train nodes, the reference pool on its node.
    Returns (output_dir, cache)."""
    cluster, dashboard = fixed_cluster
    work = tmp_path_factory.mktemp("multi-node")
    before = set(actors(dashboard, "RayTrainWorker"))
    result = run_cli(comparison_args(work / "run", work / "cache", pairs, "train.cpus_per_worker=1", *TRAIN_ROLE), cluster.address)
    assert result.returncode == 0, result.stderr[-4000:]
    roles = node_roles(dashboard)
    workers = {a: n for a, n in actors(dashboard, "RayTrainWorker").items() if a not in before}
    assert len(workers) == 2 and len(set(workers.values())) == 2 and {roles[n] for n in workers.values()} == {"train"}, (workers, roles)
    scorers = actors(dashboard, "MapWorker(MapBatches(ReferenceScorer))")
    assert scorers and {roles[n] for n in scorers.values()} == {"reference"}
    return work / "run", work / "cache"


# 2. Several nodes: the same numbers as on one node.
def test_training_across_nodes_equals_the_one_node_run(one_node_run, multi_node_run):
    assert_same_numbers(metric_rows(multi_node_run[0]), metric_rows(one_node_run[0]))
    assert json.loads((multi_node_run[0] / "run.json").read_text())["status"] == "finished"
    assert (multi_node_run[0] / "final" / "model.safetensors").exists()


# 3. A lost node: its worker's group is restored from the last registered checkpoint on a replacement node.
def test_a_lost_node_is_replaced_and_the_run_ends_as_if_uninterrupted(fixed_cluster, one_node_run, multi_node_run, pairs, tmp_path):
    cluster, dashboard = fixed_cluster
    out = tmp_path / "run"
    before = set(actors(dashboard, "RayTrainWorker"))
    run = TimedRun(comparison_args(out, multi_node_run[1], pairs, "train.cpus_per_worker=1", *TRAIN_ROLE), cluster.address, tmp_path / "lost-node.log")
    wait_for(lambda: checkpoint_step_so_far(out) > 0 and last_step(out) >= 3, "a registered checkpoint and step 3 of 18", timeout=300)
    worker_node = next(n for a, n in actors(dashboard, "RayTrainWorker").items() if a not in before)
    (lost,) = [node for node in cluster.worker_nodes if node.node_id == worker_node]
    step_at_loss = last_step(out)
    cluster.remove_node(lost, allow_graceful=False)  # the raylet and every process of that node, at once
    cluster.add_node(num_cpus=1, labels={"hdpo-role": "train"})
    assert run.wait(600) == 0, run.output[-4000:]

    kinds = [(e["event"], e.get("from_step")) for e in events(out)]
    assert kinds[0] == ("worker_failure", None) and kinds[1][0] == "restored" and len(kinds) == 2, kinds
    restored = events(out)[1]
    print(f"\nnode lost at step {step_at_loss}: restored from step {restored['from_step']} ({step_at_loss - restored['from_step']} steps recomputed), "
          f"training again {restored['recovery_s']} s after the failure was noticed")  # fmt: skip
    assert_same_numbers(metric_rows(out), metric_rows(one_node_run[0]))


# 4. A sweep across nodes: one reference pass, trials on different nodes, the numbers of one node.
def test_sweep_trials_run_on_different_nodes_from_one_reference_pass(fixed_cluster, one_node_run, pairs, tmp_path):
    cluster, dashboard = fixed_cluster
    before = set(actors(dashboard, "RayTrainWorker"))
    args = comparison_args(tmp_path / "sweep", tmp_path / "cache", pairs, "train.cpus_per_worker=0.5", *TRAIN_ROLE)
    # One epoch per trial (a constant learning rate: the first 6 steps of the full run).
    args = ["sweep", *args[1:], "train.max_steps=6", "sweep.alphas=[1.0,1.2]", "sweep.max_concurrent_trials=2", "sweep.entropy_prompts=6", "sweep.entropy_max_new_tokens=8"]
    result = run_cli(args, cluster.address, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]

    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [i["reference_forward_pairs"] for i in sweep["invocations"]] == [30]  # 24 train + 6 eval pairs, once for both trials
    roles = node_roles(dashboard)
    workers = {a: n for a, n in actors(dashboard, "RayTrainWorker").items() if a not in before}
    # Each trial packs its two half-CPU workers on one train node; the two trials ran side by side on both.
    assert len(workers) == 4 and len(set(workers.values())) == 2 and {roles[n] for n in workers.values()} == {"train"}, (workers, roles)
    trial = tmp_path / "sweep" / "trials" / "alpha=1_beta=0.1_lr=0.002"
    assert_same_numbers(metric_rows(trial), [r for r in metric_rows(one_node_run[0]) if r["step"] <= 6])
