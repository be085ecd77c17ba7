"""Scale-out on real multi-node Ray, all on this machine: a cluster that autoscales from zero (Ray's real
autoscaler, fake multi-node provider), and a fixed cluster of labelled nodes (ray.cluster_utils.Cluster)
that trains across nodes, loses a node mid-run, and runs an alpha sweep (interrupted and resumed) whose trials
land on different nodes.

Every run is the session's comparison run (tests/integration/conftest.py: 24 real pairs, 6 held out, the
embedded SFT'd tiny Llama, 2 workers, 3 epochs of 6 steps, a checkpoint every 2 steps) placed on other
clusters, and must end with the numbers of that run on the session's one-node head (the autoscaling runs:
2 steps, no eval split, no checkpoint before the last). The figures printed (-s) go into docs/results.md.
"""

from __future__ import annotations

import csv
import json
import math
import signal
from pathlib import Path

import pytest

from tests.helpers import free_port, run_cli
from tests.integration.checks import (
    checkpoint_step_so_far,
    comparison_args,
    events,
    last_step,
    metric_rows,
    ray_job,
    submit,
    wait_for,
    wait_for_job,
)
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
    """Exit 2 and exactly one error line (Ray's own INFO lines about joining the cluster
    may precede it), no traceback."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("hdpo-ray: error: ")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


# 1. A cluster that scales from zero, as KubeRay's and `ray up`'s do.
def test_a_cluster_that_scales_from_zero_is_asked_for_its_nodes(tmp_path, pairs):
    # cpu2 and slow serve the runs (the autoscaler may pick either for CPU); only slow offers slow-node.
    node_types = {
        "cpu2": {"resources": {"CPU": 2}, "max_workers": 2},
        "slow": {"resources": {"CPU": 1, "slow-node": 1}, "max_workers": 1},
    }
    with AutoscalingHead(node_types) as head:
        assert head.worker_nodes() == []  # the head has 0 CPUs: nothing can run yet

        # `hdpo-ray train`: 2 workers x 0.5 CPU beside Ray Data's
        # CPU, then the reference actor beside it: one cpu2 node.
        run = TimedRun(
            comparison_args(tmp_path / "run", tmp_path / "cache", pairs, *QUICK), head.address, tmp_path / "train.log"
        )
        assert run.wait(600) == 0, run.output[-4000:]
        assert "waiting for the autoscaler" in run.output and "the cluster holds the run after" in run.output, (
            run.output[-4000:]
        )
        nodes = head.worker_nodes()  # launched by the autoscaler: the head was alone (and had no CPU) before
        assert sum(n.resources_total.get("CPU", 0) for n in nodes) >= 2, nodes  # the autoscaler picks the node types
        assert [r["step"] for r in metric_rows(tmp_path / "run") if "loss" in r] == [1, 2]
        print(
            f"\nautoscaling from zero: {len(nodes)} nodes, the run's resources there after "
            f"{run.first('the cluster holds the run'):.1f} s, "
            f"first step at {run.first('step 1/2'):.1f} s, done at {run.lines[-1][0]:.1f} s"
        )

        # `ray job submit` of the same training, to the same cluster's job server, as under KubeRay: the package is
        # installed on every node (the image), so no working_dir (the fake nodes share one session directory,
        # and each node's runtime-env agent would delete the others' unpacked working_dir).
        job_env = (
            "--runtime-env-json",
            json.dumps({"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}}),
        )
        submit(
            head.dashboard,
            "hdpo-autoscaled",
            comparison_args(tmp_path / "job", tmp_path / "cache", pairs, *QUICK),
            job_env,
        )
        assert wait_for_job(head.dashboard, "hdpo-autoscaled", timeout=600) == "SUCCEEDED", ray_job(
            head.dashboard, "logs", "hdpo-autoscaled"
        ).stdout[-4000:]
        assert json.loads((tmp_path / "job" / "run.json").read_text())["status"] == "finished"

        # A resource no node type offers: refused once the autoscaler has looked, not after the whole wait.
        impossible = run_cli(
            comparison_args(
                tmp_path / "tpu", tmp_path / "cache", pairs, "train.resources_per_worker={tpu-slice: 1}", *QUICK
            ),
            head.address,
            timeout=300,
        )
        assert (
            "the autoscaler starts no node for this run: training workers (2 x 0.5 CPU, 1 tpu-slice) need 2 "
            "tpu-slice, but the cluster has 0; only nodes started with the custom resource tpu-slice"
        ) in one_line_error(impossible)

        # A wait that runs out (cluster.wait_for_resources_s) before the autoscaler has looked five times: one line.
        # (Two slow-node while slow is at most one node: the autoscaler would also give up, but only after 5 updates.)
        late = run_cli(
            comparison_args(
                tmp_path / "late",
                tmp_path / "cache",
                pairs,
                "train.resources_per_worker={slow-node: 1}",
                "cluster.wait_for_resources_s=1",
                *QUICK,
            ),
            head.address,
            timeout=300,
        )
        assert (
            "waited 1 s (cluster.wait_for_resources_s) and the cluster still cannot hold the run: training "
            "workers (2 x 0.5 CPU, 1 slow-node) need 2 slow-node, but the cluster has "
        ) in one_line_error(late)


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

    return {
        a.actor_id: a.node_id
        for a in list_actors(address=dashboard, filters=[("class_name", "=", class_name)], limit=10_000)
    }


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
    result = run_cli(
        comparison_args(work / "run", work / "cache", pairs, "train.cpus_per_worker=1", *TRAIN_ROLE), cluster.address
    )
    assert result.returncode == 0, result.stderr[-4000:]
    roles = node_roles(dashboard)
    workers = {a: n for a, n in actors(dashboard, "RayTrainWorker").items() if a not in before}
    assert (
        len(workers) == 2 and len(set(workers.values())) == 2 and {roles[n] for n in workers.values()} == {"train"}
    ), (workers, roles)
    scorers = actors(dashboard, "MapWorker(MapBatches(ReferenceScorer))")
    assert scorers and {roles[n] for n in scorers.values()} == {"reference"}
    return work / "run", work / "cache"


# 2. Several nodes: the same numbers as on one node.
def test_training_across_nodes_equals_the_one_node_run(one_node_run, multi_node_run):
    assert_same_numbers(metric_rows(multi_node_run[0]), metric_rows(one_node_run[0]))
    assert json.loads((multi_node_run[0] / "run.json").read_text())["status"] == "finished"
    assert (multi_node_run[0] / "final" / "model.safetensors").exists()


# 3. A lost node: its worker's group is restored from the last registered checkpoint on a replacement node.
def test_a_lost_node_is_replaced_and_the_run_ends_as_if_uninterrupted(
    fixed_cluster, one_node_run, multi_node_run, pairs, tmp_path
):
    cluster, dashboard = fixed_cluster
    out = tmp_path / "run"
    before = set(actors(dashboard, "RayTrainWorker"))
    run = TimedRun(
        comparison_args(out, multi_node_run[1], pairs, "train.cpus_per_worker=1", *TRAIN_ROLE),
        cluster.address,
        tmp_path / "lost-node.log",
    )
    wait_for(
        lambda: checkpoint_step_so_far(out) > 0 and last_step(out) >= 3,
        "a registered checkpoint and step 3 of 18",
        timeout=300,
    )
    worker_node = next(n for a, n in actors(dashboard, "RayTrainWorker").items() if a not in before)
    (lost,) = [node for node in cluster.worker_nodes if node.node_id == worker_node]
    step_at_loss = last_step(out)
    cluster.remove_node(lost, allow_graceful=False)  # the raylet and every process of that node, at once
    cluster.add_node(num_cpus=1, labels={"hdpo-role": "train"})
    assert run.wait(600) == 0, run.output[-4000:]

    kinds = [(e["event"], e.get("from_step")) for e in events(out)]
    assert kinds[0] == ("worker_failure", None) and kinds[1][0] == "restored" and len(kinds) == 2, kinds
    restored = events(out)[1]
    print(
        f"\nnode lost at step {step_at_loss}: restored from step {restored['from_step']} "
        f"({step_at_loss - restored['from_step']} steps recomputed), "
        f"training again {restored['recovery_s']} s after the failure was noticed"
    )
    assert_same_numbers(metric_rows(out), metric_rows(one_node_run[0]))


# 4. A sweep across nodes: interrupted and resumed, one reference pass, trials on both train nodes, the numbers of one
# node, the policies' entropy ordered by alpha, each trial's model evaluated on GSM8K and the sweep's tables written.
ALPHAS = (0.8, 1.0, 1.2)
TASK_METRIC = "gsm8k/pass@2/t=1"
SWEEP = [
    f"sweep.alphas=[{','.join(map(str, ALPHAS))}]",
    "sweep.max_concurrent_trials=2",
    "sweep.entropy_prompts=6",
    "sweep.entropy_max_new_tokens=16",
    "eval.tasks=[gsm8k]",
    "eval.limit=4",
    "eval.num_samples=2",
    "eval.k=[1,2]",
    "eval.temperatures=[0.5,1.0]",
    "eval.max_new_tokens=24",
    "eval.num_cpus_per_actor=0.5",
    f"sweep.metric={TASK_METRIC}",
]


def test_sweep_across_nodes_resumes_shares_one_reference_pass_and_orders_entropy_by_alpha(
    fixed_cluster, one_node_run, pairs, tmp_path
):
    cluster, dashboard = fixed_cluster
    before = set(actors(dashboard, "RayTrainWorker"))
    out = tmp_path / "sweep"
    # Each trial: the comparison run's first epoch (a constant learning rate: its first 6 steps), two half-CPU workers.
    args = comparison_args(
        out, tmp_path / "cache", pairs, "train.cpus_per_worker=0.5", "train.max_steps=6", *TRAIN_ROLE, *SWEEP
    )
    command = ["sweep", *args[1:]]
    first_trial = out / "trials" / "alpha=0.8_beta=0.1_lr=0.002"

    # 1. Interrupted (Ctrl-C) once the first trial has finished.
    first = TimedRun(command, cluster.address, tmp_path / "first.log")
    wait_for(
        lambda: (first_trial / "summary.json").exists() or first.process.poll() is not None,
        "the first trial to finish",
        timeout=600,
    )
    assert (first_trial / "summary.json").exists(), first.output[-3000:]
    first.process.send_signal(signal.SIGINT)
    assert first.wait(120) == 1 and "rerun the same command to resume it" in first.output, first.output[-3000:]
    finished_before = sorted(p.parent.name for p in (out / "trials").glob("*/summary.json"))
    assert len(finished_before) < len(ALPHAS), "the sweep ended before it could be interrupted"
    started = {
        p.parent.name: json.loads(p.read_text())["name"]
        for p in (out / "trials").glob("*/run.json")
        if p.parent.name not in finished_before
    }
    first_summary, first_metrics = (
        (first_trial / "summary.json").read_text(),
        (first_trial / "metrics.jsonl").read_text(),
    )

    # 2. The same command again resumes: finished trials are kept, the rest continue or start.
    result = run_cli(command, cluster.address, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Configuration for experiment" not in result.stdout + result.stderr  # Tune's box only with --verbose
    assert (first_trial / "summary.json").read_text() == first_summary and (
        first_trial / "metrics.jsonl"
    ).read_text() == first_metrics
    for (
        trial,
        run_name,
    ) in started.items():  # an interrupted trial's Ray Train run continued under its name, from its checkpoint
        assert json.loads((out / "trials" / trial / "run.json").read_text())["name"] == run_name
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert [float(r["alpha"]) for r in rows] == list(ALPHAS) and {r["status"] for r in rows} == {"finished"}
    assert all(int(r["steps"]) == 6 and Path(r["final_model"], "model.safetensors").exists() for r in rows)

    # One reference pass for the whole sweep (24 train + 6 eval
    # pairs), in the first invocation only; read from the shared path.
    sweep = json.loads((out / "sweep.json").read_text())
    assert [i["reference_forward_pairs"] for i in sweep["invocations"]] == [30, 0]
    assert (
        "reference forward passes over the whole sweep: 30 pairs in 2 invocation(s), 0 in the latest"
        in (out / "results.md").read_text()
    )

    # Placement: every trial packs its two workers on one train node; the trials used both train nodes.
    roles = node_roles(dashboard)
    workers = {a: n for a, n in actors(dashboard, "RayTrainWorker").items() if a not in before}
    assert (
        len(workers) >= 2 * len(ALPHAS)
        and len(set(workers.values())) == 2
        and {roles[n] for n in workers.values()} == {"train"}
    ), (workers, roles)
    # The numbers of one node: the alpha = 1 trial is the one-node run's first epoch, step for step.
    assert_same_numbers(
        metric_rows(out / "trials" / "alpha=1_beta=0.1_lr=0.002"),
        [r for r in metric_rows(one_node_run[0]) if r["step"] <= 6],
    )

    # The entropy ordering, on both measures, with the reference's own entropy on the same prompts beside it.
    for measure in ("entropy/teacher_forced", "entropy/sampled"):
        values = [float(r[measure]) for r in rows]
        assert values[0] < values[1] < values[2], (measure, values)
    reference = json.loads((out / "reference_entropy.json").read_text())
    assert reference["entropy/prompts"] == 6 and all(
        math.isfinite(reference[m]) and reference[m] > 0 for m in ("entropy/teacher_forced", "entropy/sampled")
    )
    assert (
        f"the reference model on the same prompts: teacher-forced {reference['entropy/teacher_forced']:.4g}"
        in (out / "results.md").read_text()
    )
    best = json.loads((out / "best.json").read_text())
    assert (
        best["metric"] == TASK_METRIC
        and best["best"]["trial"] in {r["trial"] for r in rows}
        and best["best"]["final_model"]
    )
    assert (out / "alpha_sweep.png").stat().st_size > 10_000

    # GSM8K on every trial's model: results in the trial's eval/, task columns, the alpha x temperature view.
    for row in rows:
        evaluation = json.loads((Path(row["final_model"]).parent / "eval" / "results.json").read_text())
        assert evaluation["model"] == row["final_model"] and evaluation["tasks"]["gsm8k"]["1"]["samples"] == 4 * 2
        assert float(row[TASK_METRIC]) == pytest.approx(evaluation["metrics"][TASK_METRIC])
    header = (out / "results.md").read_text().split("\n| trial")[1].split("\n")[0]
    assert all(f"gsm8k/{m}/t={t}" in header for m in ("pass@1", "pass@2", "entropy") for t in ("0.5", "1"))
    table = (out / "alpha_temperature.md").read_text()
    assert (
        "## gsm8k: pass@1" in table
        and "## gsm8k: entropy" in table
        and "| alpha=0.8 |" in table
        and "T=0.5 | T=1" in table
    )
    assert (out / "alpha_temperature.png").stat().st_size > 10_000
    # The sampling entropy on GSM8K prompts (completely unlike the training data) follows alpha too.
    task_entropy = [float(r["gsm8k/entropy/t=1"]) for r in rows]
    print(
        f"\nsweep across nodes: entropy teacher-forced {[float(r['entropy/teacher_forced']) for r in rows]}, "
        f"sampled on GSM8K at T=1 {task_entropy}"
    )
    assert task_entropy[0] < task_entropy[1] < task_entropy[2], task_entropy
