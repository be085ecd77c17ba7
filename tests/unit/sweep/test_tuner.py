"""The sweep's pure parts: grid, names, per-trial configs, packing, output-dir identity,
best-trial selection, result files."""

from __future__ import annotations

import csv
import json
import math

import pytest

from hdpo_ray.config import PAPER_ALPHAS, ConfigError, load_config
from hdpo_ray.sweep.grid import trial_config, trial_grid, trial_name
from hdpo_ray.sweep.results import select_best, trial_row, write_results
from hdpo_ray.sweep.tuner import (
    _check_sweep,
    _claim_output_dir,
    concurrent_trials,
    early_stopping_scheduler,
    without_final_eval,
)


def test_grid_is_one_trial_per_alpha_at_the_configured_beta_and_lr():
    config = load_config(overrides=["loss.beta=0.05", "train.lr=2e-5"])
    assert [p["alpha"] for p in trial_grid(config)] == [0.8, 1.0, 1.2]  # the demo's; the paper's has 6
    paper = load_config(overrides=[f"sweep.alphas={list(PAPER_ALPHAS)}"])
    assert [p["alpha"] for p in trial_grid(paper)] == [0.8, 0.9, 0.95, 1.0, 1.1, 1.2]
    assert {(p["beta"], p["lr"]) for p in trial_grid(config)} == {(0.05, 2e-5)}


def test_grid_crosses_alpha_beta_and_lr():
    config = load_config(overrides=["sweep.alphas=[0.8,1.2]", "sweep.betas=[0.1,0.3]", "sweep.lrs=[1e-3]"])
    grid = trial_grid(config)
    assert len(grid) == 4 and len({trial_name(p) for p in grid}) == 4
    assert grid[0] == {"alpha": 0.8, "beta": 0.1, "lr": 1e-3} and grid[1] == {"alpha": 1.2, "beta": 0.1, "lr": 1e-3}


@pytest.mark.parametrize("override", ["sweep.alphas=[]", "sweep.alphas=[0.8,-1]", "sweep.betas=[0]", "sweep.lrs=[]"])
def test_bad_grids_are_config_errors(override):
    with pytest.raises(ConfigError, match="sweep"):
        load_config(overrides=[override])


def test_trial_config_sets_the_point_and_its_own_output_dir_and_storage(tmp_path):
    base = load_config(overrides=["train.storage_path=s3://bucket/runs/"])
    config = trial_config(base, {"alpha": 0.9, "beta": 0.2, "lr": 3e-4}, str(tmp_path))
    assert (config.loss.alpha, config.loss.beta, config.train.lr) == (0.9, 0.2, 3e-4)
    assert config.output_dir == str(tmp_path / "trials" / "alpha=0.9_beta=0.2_lr=0.0003")
    assert config.train.storage_path == "s3://bucket/runs/trials/alpha=0.9_beta=0.2_lr=0.0003"
    assert base.loss.alpha == 1.0 and base.train.storage_path == "s3://bucket/runs/"  # the base is not modified
    assert (
        trial_config(load_config(), {"alpha": 1.0, "beta": 0.1, "lr": 1e-3}, str(tmp_path)).train.storage_path is None
    )  # under the trial's output_dir


@pytest.mark.parametrize(
    ("cluster", "overrides", "expected"),
    [
        ({"CPU": 2}, [], 1),  # 2 workers x 0.5 CPU + 1 CPU for Ray Data
        ({"CPU": 9}, [], 8),
        ({"CPU": 9}, ["sweep.max_concurrent_trials=3"], 3),
        ({"CPU": 64, "GPU": 8}, ["train.use_gpu=true", "train.num_workers=2", "train.cpus_per_worker=4"], 4),
        ({"CPU": 64, "GPU": 3}, ["train.use_gpu=true", "train.num_workers=2"], 1),
    ],
)
def test_concurrent_trials_pack_the_cluster(cluster, overrides, expected):
    assert concurrent_trials(load_config(overrides=overrides), cluster) == expected


def test_sweep_checks_metric_and_eval_data():
    with pytest.raises(ConfigError, match="data.eval_files"):
        _check_sweep(load_config(overrides=["data.eval_files=[]"]))
    with pytest.raises(ConfigError, match="sweep.metric 'eval/loss'"):  # the H-DPO loss does not compare across alpha
        _check_sweep(
            load_config(
                overrides=["data.eval_files=[embedded:ultrafeedback/test_prefs-100.parquet]", "sweep.metric=eval/loss"]
            )
        )
    with pytest.raises(ConfigError, match="early_stopping"):
        _check_sweep(
            load_config(
                overrides=[
                    "data.eval_files=[embedded:ultrafeedback/test_prefs-100.parquet]",
                    "sweep.early_stopping=true",
                    "sweep.metric=entropy/sampled",
                ]
            )
        )


def test_sweep_checks_the_task_metric_and_the_eval_plan_before_training(tmp_path):
    from hdpo_ray.eval.tasks import TaskDataError

    eval_data = "data.eval_files=[embedded:ultrafeedback/test_prefs-100.parquet]"
    _check_sweep(
        load_config(
            overrides=[eval_data, "eval.tasks=[gsm8k]", "eval.temperatures=[0.6]", "sweep.metric=gsm8k/pass@1/t=0.6"]
        )
    )
    # a task's own metric
    _check_sweep(load_config(overrides=[eval_data, "eval.tasks=[ifeval]", "sweep.metric=ifeval/prompt_loose/t=1"]))
    with pytest.raises(ConfigError, match="nor a metric of eval.tasks"):  # a temperature that is not sampled
        _check_sweep(
            load_config(
                overrides=[
                    eval_data,
                    "eval.tasks=[gsm8k]",
                    "eval.temperatures=[1.0]",
                    "sweep.metric=gsm8k/pass@1/t=0.6",
                ]
            )
        )
    with pytest.raises(ConfigError, match="nor a metric of eval.tasks"):  # a task that is not evaluated
        _check_sweep(load_config(overrides=[eval_data, "sweep.metric=gsm8k/pass@1/t=1"]))
    bad = tmp_path / "gsm8k.jsonl"
    bad.write_text('{"question": "1+1?"}\n')
    # the task data is read before any trial trains
    with pytest.raises(TaskDataError, match="field 'answer' is missing"):
        _check_sweep(load_config(overrides=[eval_data, "eval.tasks=[gsm8k]", f"eval.data.gsm8k={bad}"]))


def test_output_dir_resumes_the_same_sweep_and_refuses_another(tmp_path):
    config = load_config(overrides=["sweep.alphas=[0.8,1.0]"])
    state = _claim_output_dir(config, tmp_path)
    (tmp_path / "sweep.json").write_text(json.dumps(state))
    assert (
        _claim_output_dir(load_config(overrides=["sweep.alphas=[0.8,1.0]", f"output_dir={tmp_path}"]), tmp_path)[
            "config"
        ]
        == state["config"]
    )
    with pytest.raises(ConfigError, match=r"sweep.alphas: \[0.8, 1.0\] there, \[0.8, 1.2\] now"):
        _claim_output_dir(load_config(overrides=["sweep.alphas=[0.8,1.2]"]), tmp_path)
    with pytest.raises(ConfigError, match="sweep.max_concurrent_trials"):  # Tuner.restore keeps the first TuneConfig
        _claim_output_dir(load_config(overrides=["sweep.alphas=[0.8,1.0]", "sweep.max_concurrent_trials=2"]), tmp_path)


def _row(alpha, status="finished", metric=0.5, **extra):
    params = {"alpha": alpha, "beta": 0.1, "lr": 1e-3}
    row = trial_row(
        params,
        {"loss": 0.7, "eval/policy_accuracy": metric, "step": 10},
        {"entropy/teacher_forced": 5 * alpha, "entropy/sampled": 4 * alpha},
        steps=10,
        wall_s=12.34,
        final_model=f"/m/{alpha}",
        status=status,
    )
    return row | extra


def test_select_best_uses_finished_trials_with_finite_metric():
    rows = [
        _row(0.8, metric=0.6),
        _row(1.0, metric=0.7, status="stopped early"),
        _row(1.1, metric=math.nan),
        _row(1.2, metric=0.6),
    ]
    assert select_best(rows, "eval/policy_accuracy", "max")["alpha"] == 0.8  # tie: first in grid order
    assert select_best(rows, "entropy/sampled", "min")["alpha"] == 0.8
    assert select_best([_row(1.0, status="error: x")], "eval/policy_accuracy", "max") is None


def test_write_results_files(tmp_path):
    config = load_config(overrides=["sweep.alphas=[0.8,1.2]"])
    rows = [_row(0.8, metric=0.55), _row(1.2, metric=0.65)]
    best = write_results(
        config, tmp_path, rows, reference={"pairs": 994, "forward_pairs": 994, "this_run": 0, "invocations": 2}
    )
    assert best["alpha"] == 1.2
    table = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert (
        [float(r["alpha"]) for r in table] == [0.8, 1.2]
        and table[1]["final_model"] == "/m/1.2"
        and float(table[0]["entropy/teacher_forced"]) == 4.0
    )
    md = (tmp_path / "results.md").read_text()
    assert "reference forward passes over the whole sweep: 994 pairs in 2 invocation(s), 0 in the latest" in md
    assert "best trial: **alpha=1.2_beta=0.1_lr=0.001**" in md and md.count("\n| alpha=") == 2
    assert json.loads((tmp_path / "best.json").read_text())["best"]["trial"] == "alpha=1.2_beta=0.1_lr=0.001"
    assert (tmp_path / "alpha_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_early_stopping_is_asha_on_the_metric_over_steps_and_never_stops_a_last_report():
    assert early_stopping_scheduler(load_config(), 100) is None
    asha = early_stopping_scheduler(
        load_config(overrides=["sweep.early_stopping=true", "train.eval_steps=20", "sweep.mode=max"]), 100
    )
    assert (asha._time_attr, asha.metric, asha._max_t, asha._reduction_factor, asha._stop_last_trials) == (
        "step",
        "eval/policy_accuracy",
        100,
        2,
        False,
    )
    assert [milestone for milestone, _ in asha._brackets[0]._rungs] == [80, 40, 20]  # grace = eval_steps, then x2
    asha = early_stopping_scheduler(
        load_config(overrides=["sweep.early_stopping=true", "train.eval_steps=20", "sweep.grace_steps=50"]), 30
    )
    assert [milestone for milestone, _ in asha._brackets[0]._rungs] == [29]  # capped below the last step
    # The last step's report reaches Tune without eval metrics, so ASHA (which skips results without its
    # metric) cannot stop a trial between the end of training and its export; earlier reports keep them.
    last = {"step": 30, "loss": 0.5, "eval/policy_accuracy": 0.4, "eval/loss": 0.7}
    assert without_final_eval(last, 30) == {"step": 30, "loss": 0.5}
    assert without_final_eval({**last, "step": 10}, 30) == {**last, "step": 10}

    class Trial:
        trial_id = "worst"

    asha.on_trial_add(None, Trial)
    assert asha.on_trial_result(None, Trial, without_final_eval(last, 30)) == "CONTINUE"


def _trainable(config: dict) -> None:
    import ray.tune

    if config["alpha"] > 1:
        raise RuntimeError("a failing trial")
    ray.tune.report({"loss": config["alpha"]})


def test_trial_states_come_from_tunes_experiment_state(ray_session, tmp_path):
    """What tells an early-stopped trial from an interrupted one: Tune's states, read through its public API."""
    from ray import tune

    from hdpo_ray.sweep.tuner import _tune_trials

    tuner = tune.Tuner(
        _trainable,
        param_space={"alpha": tune.grid_search([0.8, 1.2])},
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="states", verbose=0),
    )
    states = {t.config["alpha"]: t.status for t in _tune_trials(tuner.fit())}
    assert states == {0.8: "TERMINATED", 1.2: "ERROR"}
