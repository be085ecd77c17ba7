"""RunTracker without Ray: what it writes for reports, checkpoint-only reports, failures and restores."""

from __future__ import annotations

import json
import pickle

import pytest

from hdpo_ray.config import load_config
from hdpo_ray.train.progress import RunDisplay
from hdpo_ray.train.tracking import CHECKPOINT_ONLY_KEY, NOTICE_KEY, RESTORED_KEY, RunTracker, progress_line
from tests.helpers import tensorboard_scalars


def _row(step: int, loss: float) -> dict:
    return {
        "step": step,
        "epoch": 0,
        "loss": loss,
        "rewards/accuracies": 0.5,
        "rewards/margins": 0.1,
        "tokens_per_s": 10.0,
    }


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def tracker(tmp_path):
    config = load_config(overrides=[f"output_dir={tmp_path}"])
    return pickle.loads(pickle.dumps(RunTracker(config, str(tmp_path), mlflow_run_id=None)))  # as Ray ships it


def test_reports_become_rows_and_checkpoint_only_reports_do_not(tracker, tmp_path, capsys):
    display = RunDisplay(str(tmp_path), total_steps=6, tty=False)  # the driver's view of the files
    for step in (1, 2):
        tracker.after_report(None, [_row(step, {1: 0.6, 2: 0.5}[step])], None)
        display.poll()
    tracker.after_report(None, [{"step": 2, "epoch": 0, CHECKPOINT_ONLY_KEY: True}], "a checkpoint")
    assert [(r["step"], r["loss"]) for r in _rows(tmp_path)] == [(1, 0.6), (2, 0.5)]
    assert all("time" in r and CHECKPOINT_ONLY_KEY not in r for r in _rows(tmp_path))
    tracker.tensorboard.close()  # the writer's thread has written everything
    assert [v for _, v in tensorboard_scalars(tmp_path / "tensorboard")["loss"]] == pytest.approx([0.6, 0.5])
    display.poll()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("[hdpo-ray] step 2/6 | loss 0.5000")


def test_a_restore_replaces_the_rows_of_the_steps_trained_again(tracker, tmp_path, capsys):
    display = RunDisplay(str(tmp_path), total_steps=6, tty=False)
    for step in (1, 2, 3, 4):
        tracker.after_report(None, [_row(step, 1.0)], None)
    display.poll()
    tracker.after_exception(None, {1: RuntimeError("worker died\nsecond line")})
    display.poll()
    tracker.after_report(None, [_row(3, 0.25) | {RESTORED_KEY: 2}], None)  # the first report after the restore
    display.poll()
    assert [(r["step"], r["loss"]) for r in _rows(tmp_path)] == [(1, 1.0), (2, 1.0), (3, 0.25)]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "worker_failure" and events[0]["ranks"] == [1] and events[0]["last_step"] == 4
    assert events[0]["errors"] == {"1": "RuntimeError: worker died"}
    assert events[1]["event"] == "restored" and events[1]["from_step"] == 2 and events[1]["steps_recomputed"] == 2
    assert events[1]["recovery_s"] >= 0
    # TensorBoard shows the new value at step 3, not both
    tracker.tensorboard.close()
    assert tensorboard_scalars(tmp_path / "tensorboard")["loss"] == [(1, 1.0), (2, 1.0), (3, 0.25)]
    shown = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in shown if " | " in line] == [
        f"[hdpo-ray] step {s}/6" for s in (1, 2, 3, 4, 3)
    ]
    assert "worker failure on rank 1 after step 4 (rank 1: RuntimeError: worker died)" in shown[4]
    assert "restored from the checkpoint at step 2" in shown[5] and "steps 3-4 are trained again" in shown[5]


def test_a_display_that_polls_between_the_restore_and_the_replayed_steps_shows_each_step_once(
    tracker, tmp_path, capsys
):
    """The restore's event comes with the rows of the steps trained again already gone: a poll right after it
    neither shows old rows as new nor skips the new ones (here the first report after the restore is a
    checkpoint-only one)."""
    display = RunDisplay(str(tmp_path), total_steps=6, tty=False)
    for step in (1, 2, 3, 4):
        tracker.after_report(None, [_row(step, 1.0)], None)
    display.poll()
    tracker.after_report(None, [{"step": 2, "epoch": 0, CHECKPOINT_ONLY_KEY: True, RESTORED_KEY: 2}], "checkpoint")
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2]
    display.poll()
    for step in (3, 4):
        tracker.after_report(None, [_row(step, 0.5)], None)
        display.poll()
    shown = [line.split(" | ")[:2] for line in capsys.readouterr().out.splitlines() if " | " in line]
    assert [s for s, _ in shown] == [f"[hdpo-ray] step {s}/6" for s in (1, 2, 3, 4, 3, 4)]
    assert [loss for _, loss in shown[4:]] == ["loss 0.5000", "loss 0.5000"]


def test_a_notice_from_rank_0_is_shown_once_and_is_not_a_metric(tracker, tmp_path, capsys):
    display = RunDisplay(str(tmp_path), total_steps=6, tty=False)
    tracker.after_report(None, [_row(1, 1.0) | {NOTICE_KEY: "train.packing: m pads instead"}], None)
    display.poll()
    display.poll()
    assert NOTICE_KEY not in _rows(tmp_path)[0]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[hdpo-ray] train.packing: m pads instead" and len(lines) == 2


def test_a_torn_line_is_skipped_and_a_display_error_never_ends_the_run(tracker, tmp_path, capsys):
    display = RunDisplay(str(tmp_path), total_steps=6, tty=False)
    (tmp_path / "events.jsonl").write_text('{"event": "notice", "te\n{"event": "notice", "text": "kept"}\n')
    display.poll()
    assert capsys.readouterr().out.splitlines() == ["[hdpo-ray] kept"]
    (tmp_path / "metrics.jsonl").write_text('{"step": "one"}\n')  # a row the display cannot order
    with display:
        pass
    out = capsys.readouterr().out
    assert "warning: the progress display stopped (TypeError" in out and out.count("warning") == 1


def test_progress_line_shows_what_was_computed():
    line = progress_line(_row(3, 0.5) | {"eval/loss": 0.9, "eval/rewards/accuracies": 0.75}, 6, 65.0, 30.0)
    assert line == (
        "[hdpo-ray] step 3/6 | loss 0.5000 | acc 0.50 | margin +0.1000 | 10 tok/s | eval loss 0.9000 acc 0.75 | "
        "elapsed 0:01:05 ETA 0:00:30"
    )
    assert progress_line({"step": 1}, 6, 1.0, float("nan")).endswith("step 1/6 | elapsed 0:00:01 ETA --:--")


def test_the_display_follows_a_run_from_its_files_and_skips_what_an_earlier_driver_showed(tracker, tmp_path, capsys):
    tracker.after_report(None, [_row(1, 0.7)], None)
    with RunDisplay(str(tmp_path), total_steps=6, tty=False):  # a resumed run's driver: step 1 was shown before
        for step in (2, 3):
            tracker.after_report(None, [_row(step, 0.6)], None)
    assert [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines()] == [
        "[hdpo-ray] step 2/6",
        "[hdpo-ray] step 3/6",
    ]
