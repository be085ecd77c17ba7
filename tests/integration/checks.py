"""What a finished `hdpo-ray train` run directory must hold, and helpers that submit and
watch runs; shared by the CLI, job and multi-node tests."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, ray_cli, tensorboard_scalars

FAST = ["data.max_length=64", "data.max_prompt_length=32", "train.per_device_batch_size=2", "reference.batch_size=8"]
"""Overrides for tiny end-to-end runs: short pairs, small batches."""

TRAIN_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "entropy",
    "lr",
    "grad_norm",
    "tokens_per_s",
)


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def trained_state(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The policy weights in a DeepSpeed checkpoint, consolidated independently of our export."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag="engine")
    return {k.removeprefix("model."): v for k, v in state.items()}


def checkpoint_step(out: Path) -> int:
    """The step of the run's latest registered checkpoint: where a restore starts."""
    return json.loads((registered_checkpoints(out)[-1] / "hdpo_state.json").read_text())["step"]


def checkpoint_step_so_far(out: Path) -> int:
    """checkpoint_step while the run is going: 0 before the first registered checkpoint
    (or mid-write of Ray's snapshot)."""
    try:
        return checkpoint_step(out)
    except (OSError, ValueError, IndexError):
        return 0


def registered_checkpoints(out: Path) -> list[Path]:
    """The run's checkpoint folders that Ray Train registered, oldest first."""
    (run_dir,) = [p for p in (out / "checkpoints").iterdir() if p.is_dir() and not p.name.startswith(".")]
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    return [run_dir / r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]


def assert_finished_run(out: Path, *, steps_per_epoch: int, epochs: int, checkpoints_kept: int) -> None:
    """24 pairs (6 eval) trained with logging every step: reports, metrics, TensorBoard, checkpoints, export."""
    report = json.loads((out / "data_report.json").read_text())
    assert report["train"]["read"] == 24 and report["train"]["valid"] == 24 and report["eval"]["valid"] == 6
    assert json.loads((out / "run.json").read_text())["status"] == "finished"

    rows = metric_rows(out)
    train_rows = [r for r in rows if "loss" in r]
    for key in TRAIN_KEYS:
        assert all(key in r and math.isfinite(r[key]) for r in train_rows), key
    assert all(r["nonfinite/skipped_batches"] == 0 and r["nonfinite/skipped_steps"] == 0 for r in train_rows)
    assert any("eval/rewards/accuracies" in r for r in rows) and "eval/loss" in rows[-1]
    steps = [r["step"] for r in train_rows]
    assert steps == list(range(1, steps_per_epoch * epochs + 1)), steps  # 24 pairs / 2 workers / 2 per batch per epoch
    # Step 1's loss is taken before any update, with policy == reference and alpha = 1: exactly ln 2.
    # (float rounding of differently padded batches)
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    losses = [r["loss"] for r in train_rows]
    first, last = losses[:steps_per_epoch], losses[-steps_per_epoch:]
    # the last epoch's loss is well below the first's
    assert sum(last) / len(last) < sum(first) / len(first) - 0.1, losses
    scalars = tensorboard_scalars(out / "tensorboard")
    assert [step for step, _ in scalars["loss"]] == steps and [v for _, v in scalars["loss"]] == pytest.approx(
        losses, rel=1e-6
    )
    assert "eval/loss" in scalars and "rewards/accuracies" in scalars

    checkpoints = registered_checkpoints(out)
    on_disk = sorted(p for p in checkpoints[0].parent.iterdir() if p.is_dir())
    assert len(checkpoints) == checkpoints_kept and on_disk == sorted(checkpoints)  # older ones deleted, no strays

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert AutoTokenizer.from_pretrained(out / "final").chat_template
    exported = load_file(out / "final" / "model.safetensors")
    trained = trained_state(checkpoints[-1])
    for name in model.state_dict():
        if name in exported:
            assert torch.equal(exported[name], trained[name]), name
    from hdpo_ray.models import load_causal_lm

    # it did train: the weights moved away from the model the run started from
    started = load_causal_lm(json.loads((out / "config.json").read_text())["model"]["name_or_path"]).state_dict()
    assert not torch.equal(exported["model.norm.weight"], started["model.norm.weight"])


def mlflow_history(uri: str):
    """(the only run of experiment hdpo-ray, {metric: [(step, value)]}) from an MLflow tracking store."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("hdpo-ray").experiment_id])
    history = {
        key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
        for key in run.data.metrics
    }
    return run, history


def ray_job(dashboard_url: str, command: str, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """`ray job COMMAND --address URL ARGS...` (options before any `--` entrypoint)."""
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [ray_cli(), "job", command, "--address", dashboard_url, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )


def submit(
    dashboard_url: str,
    submission_id: str,
    hdpo_args: list[str],
    runtime_env: tuple[str, ...] = ("--runtime-env", "jobs/runtime_env.yaml"),
) -> None:
    """`ray job submit --no-wait` of `python -m hdpo_ray ...`, with jobs/runtime_env.yaml as jobs/README.md says
    (or other runtime-env options). The head's PATH may not lead to this interpreter, so its absolute path is the
    entrypoint's python."""
    result = ray_job(
        dashboard_url,
        "submit",
        "--submission-id",
        submission_id,
        *runtime_env,
        "--no-wait",
        "--",
        sys.executable,
        "-m",
        "hdpo_ray",
        *hdpo_args,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def job_status(dashboard_url: str, submission_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(dashboard_url).get_job_status(submission_id).value)


def wait_for(predicate, what: str, timeout: float = 300, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_for_job(dashboard_url: str, submission_id: str, timeout: float = 400) -> str:
    status = wait_for(
        lambda: (s := job_status(dashboard_url, submission_id)) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
        f"job {submission_id} to end",
        timeout,
    )
    return status


def last_step(out: Path) -> int:
    """Highest step logged so far (a row being written may be cut short)."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return max(steps)


def events(out: Path) -> list[dict]:
    path = out / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def comparison_args(out: Path, cache: Path, pairs: tuple[Path, Path], *extra: str) -> list[str]:
    """`hdpo-ray train` arguments: 2 workers, 3 epochs of 6 steps (enough steps after a lost node or worker for
    Ray Train to notice before the run ends), a checkpoint every 2 steps, eval every 6. A constant learning
    rate, so that a run cut short (a sweep's trials, max_steps) matches the first steps of the full run."""
    train, test = pairs
    return [
        "train",
        f"output_dir={out}",
        f"reference.cache_dir={cache}",
        f"data.train_files=[{train}]",
        f"data.eval_files=[{test}]",
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.torch_threads=1",
        "train.zero_stage=2",
        "train.epochs=3",
        "train.lr=2e-3",
        "train.lr_scheduler=constant",
        "train.warmup_ratio=0",
        "train.logging_steps=1",
        "train.save_steps=2",
        "train.eval_steps=6",
        "train.keep_checkpoints=2",
        "train.max_failures=1",
        *FAST,
        *extra,
    ]
