"""`hdpo-ray sweep` end to end on the embedded default (SFT'd tiny Llama, real UltraFeedback pairs):
interrupted after its first trial and rerun, it resumes without rerunning that trial, runs the
reference model once per pair for the whole sweep, and the trained policies' entropy follows alpha.
Each trial's model is also evaluated on GSM8K (eval.tasks), selected on a task metric, and the sweep
writes the alpha x temperature table."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hdpo_ray.models import ASSETS
from tests.conftest import REPO, hdpo_ray_exe

pytestmark = pytest.mark.slow
ALPHAS = (0.8, 1.0, 1.2)
TRAIN_PAIRS, EVAL_PAIRS = 128, 48
TASK_METRIC = "gsm8k/pass@2/t=1"


@pytest.fixture
def subset(tmp_path) -> tuple[Path, Path]:
    """The first rows of the embedded splits (real data), so the reference pass stays short."""
    train, test = tmp_path / "train.parquet", tmp_path / "test.parquet"
    pq.write_table(pq.read_table(ASSETS / "ultrafeedback/train_prefs-900.parquet").slice(0, TRAIN_PAIRS), train)
    pq.write_table(pq.read_table(ASSETS / "ultrafeedback/test_prefs-100.parquet").slice(0, EVAL_PAIRS), test)
    return train, test


def _command(out: Path, cache: Path, train: Path, test: Path) -> list[str]:
    return [
        hdpo_ray_exe(), "sweep", f"output_dir={out}", f"reference.cache_dir={cache}", f"data.train_files=[{train}]", f"data.eval_files=[{test}]",
        # One worker (8 pairs a step), so that Ray Data feeds every trial the pairs in the same order; two trials run at once.
        "train.num_workers=1", "train.per_device_batch_size=8", "train.max_steps=16", "train.lr=1e-3", "train.logging_steps=8",
        "train.eval_steps=16", "train.save_steps=8", "data.max_length=128",
        f"sweep.alphas=[{','.join(map(str, ALPHAS))}]", "sweep.entropy_prompts=32", "sweep.entropy_max_new_tokens=32",
        "eval.tasks=[gsm8k]", "eval.limit=4", "eval.num_samples=2", "eval.k=[1,2]", "eval.temperatures=[0.5,1.0]", "eval.max_new_tokens=24", "eval.num_cpus_per_actor=0.5",
        f"sweep.metric={TASK_METRIC}",
    ]  # fmt: skip


@pytest.mark.timeout(1500)
def test_sweep_resumes_shares_one_reference_pass_and_orders_entropy_by_alpha(ray_address, tmp_path, subset):
    out, cache = tmp_path / "sweep", tmp_path / "cache"
    command = _command(out, cache, *subset)
    env = os.environ | {"RAY_ADDRESS": ray_address, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    first_trial = out / "trials" / "alpha=0.8_beta=0.1_lr=0.001"

    # 1. Interrupt (Ctrl-C) once the first trial has finished.
    log = open(tmp_path / "first.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.time() + 600
    while not (first_trial / "summary.json").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(2)
    assert (first_trial / "summary.json").exists(), (tmp_path / "first.log").read_text()[-3000:]
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    finished_before = sorted(p.parent.name for p in (out / "trials").glob("*/summary.json"))
    assert len(finished_before) < len(ALPHAS), "the sweep ended before it could be interrupted"
    assert process.returncode == 1 and "rerun the same command to resume it" in (tmp_path / "first.log").read_text()
    started = {p.parent.name: json.loads(p.read_text())["name"] for p in (out / "trials").glob("*/run.json") if p.parent.name not in finished_before}
    first_summary = (first_trial / "summary.json").read_text()
    first_metrics = (first_trial / "metrics.jsonl").read_text()

    # 2. The same command again resumes: finished trials are kept, the rest run.
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (first_trial / "summary.json").read_text() == first_summary
    assert (first_trial / "metrics.jsonl").read_text() == first_metrics  # not trained again

    for trial, run_name in started.items():  # an interrupted trial's Ray Train run continued under its name, from its checkpoint
        assert json.loads((out / "trials" / trial / "run.json").read_text())["name"] == run_name

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [float(r["alpha"]) for r in rows] == list(ALPHAS) and {r["status"] for r in rows} == {"finished"}
    assert all(int(r["steps"]) == 16 and Path(r["final_model"], "model.safetensors").exists() for r in rows)

    # One reference pass for the whole sweep: every pair scored once, in the first invocation only.
    state = json.loads((out / "sweep.json").read_text())
    pairs = TRAIN_PAIRS + EVAL_PAIRS - 1  # one eval row of this slice has identical completions (skipped, counted)
    assert [i["reference_forward_pairs"] for i in state["invocations"]] == [pairs, 0]
    assert f"reference forward passes over the whole sweep: {pairs} pairs in 2 invocation(s), 0 in the latest" in (out / "results.md").read_text()

    # The entropy ordering, on both measures.
    for measure in ("entropy/teacher_forced", "entropy/sampled"):
        values = [float(r[measure]) for r in rows]
        assert values[0] < values[1] < values[2], (measure, values)
    # The reference's own entropy on the same prompts and seed, measured once and shown beside the trials.
    reference = json.loads((out / "reference_entropy.json").read_text())
    assert reference["entropy/prompts"] == 32 and all(math.isfinite(reference[m]) and reference[m] > 0 for m in ("entropy/teacher_forced", "entropy/sampled"))
    assert f"the reference model on the same prompts: teacher-forced {reference['entropy/teacher_forced']:.4g}" in (out / "results.md").read_text()
    best = json.loads((out / "best.json").read_text())
    assert best["metric"] == TASK_METRIC and best["best"]["trial"] in {r["trial"] for r in rows} and best["best"]["final_model"]
    assert (out / "alpha_sweep.png").stat().st_size > 10_000

    # GSM8K on every trial's model: results in the trial's eval/, task columns, the alpha x temperature view.
    for row in rows:
        evaluation = json.loads((Path(row["final_model"]).parent / "eval" / "results.json").read_text())
        assert evaluation["model"] == row["final_model"] and evaluation["tasks"]["gsm8k"]["1"]["samples"] == 4 * 2
        assert float(row[TASK_METRIC]) == pytest.approx(evaluation["metrics"][TASK_METRIC])
    header = (out / "results.md").read_text().split("\n| trial")[1].split("\n")[0]
    assert all(f"gsm8k/{m}/t={t}" in header for m in ("pass@1", "pass@2", "entropy") for t in ("0.5", "1"))
    table = (out / "alpha_temperature.md").read_text()
    assert "## gsm8k: pass@1" in table and "## gsm8k: entropy" in table and "| alpha=0.8 |" in table and "T=0.5 | T=1" in table
    assert (out / "alpha_temperature.png").stat().st_size > 10_000
    # The sampling entropy on GSM8K prompts (completely unlike the training data) follows alpha too.
    task_entropy = [float(r["gsm8k/entropy/t=1"]) for r in rows]
    assert task_entropy[0] < task_entropy[1] < task_entropy[2], task_entropy
