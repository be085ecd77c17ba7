"""`ray job submit` against the session's real Ray head (dashboard and job server on 127.0.0.1), and runs
that lose their job, a worker and their driver, then end exactly where an uninterrupted run ends.

The uninterrupted run is the session's one-node comparison run (tests/integration/conftest.py: the
embedded default on 24 real pairs, 2 DeepSpeed CPU workers, 3 epochs of 6 steps, a checkpoint every 2
steps, ZeRO-2). The interrupted one uses ZeRO-3 (gradient checkpointing, several LM-head chunks per
micro-batch): the same numbers from both also check that ZeRO-3 partitions, consolidates and restores
without changing them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.request

import psutil
import pytest

from tests.integration.checks import (
    assert_finished_run,
    checkpoint_step,
    checkpoint_step_so_far,
    comparison_args,
    events,
    last_step,
    metric_rows,
    ray_job,
    registered_checkpoints,
    submit,
    trained_state,
    wait_for,
    wait_for_job,
)

STEPS = 18
ZERO3 = ["train.zero_stage=3", "model.gradient_checkpointing=true", "model.logprob_chunk_tokens=16"]
# At most one step a second (reports wait for the controller's poll), so that `ray job stop` after step 9
# lands before step 18: a tiny model's steps otherwise take a fraction of a second.
PACED = ["train.report_poll_s=1"]


def processes(*words: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if all(word in command for word in words):
            found.append(process)
    return found


@pytest.mark.slow
def test_job_submit_trains_the_embedded_default(dashboard_url, one_node_run):
    """SUCCEEDED, `ray job logs` (progress lines), the run's files, MLflow, and the dashboard's names."""
    out, submission_id = one_node_run
    logs = ray_job(dashboard_url, "logs", submission_id)
    assert (
        logs.returncode == 0
        and f"[hdpo-ray] step 2/{STEPS} | loss" in logs.stdout
        and f"[hdpo-ray] step {STEPS}/{STEPS} | loss" in logs.stdout
        and "[hdpo-ray] done in" in logs.stdout
    ), logs.stdout[-3000:]
    assert "Traceback" not in logs.stdout
    # Quiet: the driver's own lines only, none of Ray's worker/actor output (weight-loading bars, start-up lines,
    # Ray Data's notices), whatever `ray job logs` adds around them
    ours = [line for line in logs.stdout.splitlines() if line.startswith("[hdpo-ray]")]
    assert len(ours) <= 40 and not [
        line for line in logs.stdout.splitlines() if "pid=" in line or "Loading weights" in line or "Dataset" in line
    ], logs.stdout[-3000:]
    listed = ray_job(dashboard_url, "list")
    assert submission_id in listed.stdout and "SUCCEEDED" in listed.stdout
    assert_finished_run(out, steps_per_epoch=6, epochs=3, checkpoints_kept=2)

    # MLflow (a local file store): one finished run named as the
    # Ray Train run, the config as params, every logged value.
    from tests.integration.checks import mlflow_history

    run, history = mlflow_history(f"file://{out.parent}/mlruns")
    assert run.info.status == "FINISHED" and run.info.run_name == json.loads((out / "run.json").read_text())["name"]
    assert run.data.params["loss.alpha"] == "1.0" and run.data.params["train.zero_stage"] == "2"
    rows = [r for r in metric_rows(out) if "loss" in r]
    assert history["loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]
    assert [step for step, _ in history["eval/loss"]] == [6, 12, 18]

    # The dashboard shows the stages and the actors by name: the reference pool, the training workers.
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    job_id = JobSubmissionClient(dashboard_url).get_job_info(submission_id).job_id
    actor_classes = {
        a.class_name for a in list_actors(address=dashboard_url, filters=[("job_id", "=", job_id)], limit=10_000)
    }
    assert {"TrainController", "RayTrainWorker", "MapWorker(MapBatches(ReferenceScorer))"} <= actor_classes, (
        actor_classes
    )
    with urllib.request.urlopen(f"{dashboard_url}/api/data/datasets/{job_id}", timeout=30) as response:
        datasets = {d["dataset"].split("_")[0] for d in json.loads(response.read())["datasets"]}
    assert {"encode-train", "encode-eval", "reference-train", "reference-eval", "train", "eval"} <= datasets, datasets


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_worker_stopped_job_and_resume_end_like_the_uninterrupted_run(
    dashboard_url, one_node_run, pairs, tmp_path
):
    """A training worker SIGKILLed (Ray Train restores it), then `ray job stop` (the driver ends at once: it has
    no SIGTERM handler, as under SIGKILL), then `ray job submit ... hdpo-ray train --resume RUN_DIR`:
    18 steps in all, each logged once, the same numbers as the run without failures (whose reference cache it reads)."""
    out = tmp_path / "interrupted"

    # 1. One training worker is SIGKILLed once checkpoint 4 is registered; Ray Train restores the group from it
    # (the next save, step 6, is two steps away when the kill comes).
    submit(
        dashboard_url, "hdpo-interrupted", comparison_args(out, one_node_run[0].parent / "cache", pairs, *ZERO3, *PACED)
    )
    wait_for(lambda: checkpoint_step_so_far(out) >= 4, "checkpoint 4")
    (worker, *_) = processes("RayTrainWorker")
    first_restore = checkpoint_step(out)
    killed_at = time.time()
    os.kill(worker.pid, signal.SIGKILL)
    restored = wait_for(
        lambda: [e for e in events(out) if e["event"] == "restored"], "Ray Train to restore after the worker kill"
    )
    print(
        f"worker killed -> training again in {restored[0]['time'] - killed_at:.1f} s (Ray Train's count from the "
        f"failure: {restored[0]['recovery_s']} s)"
    )

    # 2. `ray job stop` after step 9 (checkpoint 8): the driver and its workers go, the checkpoints stay.
    wait_for(lambda: last_step(out) >= 9, "step 9")
    assert ray_job(dashboard_url, "stop", "hdpo-interrupted").returncode == 0
    assert wait_for_job(dashboard_url, "hdpo-interrupted") == "STOPPED"
    second_restore = checkpoint_step(out)  # 8, or later if the job got that far before it stopped
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    # A save cut short (as if the driver died while uploading one) is never used: a folder Ray Train did not register.
    newest = registered_checkpoints(out)[-1]
    partial = newest.with_name("checkpoint_2099-01-01_00-00-00.000000")
    shutil.copytree(newest, partial)
    (partial / "hdpo_state.json").write_text(json.dumps({"step": 17, "epoch": 2, "micro_batches_in_epoch": 5}))
    shutil.rmtree(partial / "engine")  # no DeepSpeed state at all

    # 3. The next submission, `hdpo-ray train --resume RUN_DIR`, finishes the run from the latest checkpoint.
    submit(dashboard_url, "hdpo-resumed", ["train", "--resume", str(out)])
    assert wait_for_job(dashboard_url, "hdpo-resumed") == "SUCCEEDED", ray_job(
        dashboard_url, "logs", "hdpo-resumed"
    ).stdout[-4000:]
    assert not partial.exists()
    logs = ray_job(dashboard_url, "logs", "hdpo-resumed").stdout
    assert "resuming run" in logs and f"restored from the checkpoint at step {second_restore}" in logs, logs[-3000:]
    kinds = [(e["event"], e.get("from_step")) for e in events(out)]
    assert kinds == [("worker_failure", None), ("restored", first_restore), ("restored", second_restore)], kinds
    assert 0 < restored[0]["recovery_s"] < 180
    assert_finished_run(out, steps_per_epoch=6, epochs=3, checkpoints_kept=2)  # steps 1..12 each logged once

    # The same run as the uninterrupted ZeRO-2 one, to float tolerance (ZeRO-3 sums in another order:
    # 2e-6 relative on the losses when measured): data order, skipped batches, optimizer state all restored.
    reference, rows = metric_rows(one_node_run[0]), metric_rows(out)
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for key in ("loss", "rewards/margins", "eval/loss", "eval/rewards/accuracies", "grad_norm", "lr"):
        assert [r.get(key) for r in rows] == pytest.approx([r.get(key) for r in reference], rel=1e-3, abs=1e-4), key
    # Weights: ZeRO-3 sums in another order, and Adam divides the sign noise of near-zero gradients by their
    # own tiny scale. Measured (Frobenius, relative): 2e-7 on most matrices, up to 1.1e-5 on one MLP matrix
    # (2.8e-5 largest entry); a wrong restore or data order moves the losses above by far more than 1e-3.
    uninterrupted_weights = trained_state(registered_checkpoints(one_node_run[0])[-1])
    for name, tensor in trained_state(registered_checkpoints(out)[-1]).items():
        difference = (tensor - uninterrupted_weights[name]).detach()
        assert difference.norm() <= 5e-5 * uninterrupted_weights[name].norm() and difference.abs().max() < 1e-4, name
