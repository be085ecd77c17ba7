"""What a training run leaves to watch it by: metrics.jsonl, TensorBoard, MLflow, events.jsonl.

`RunTracker` is a Ray Train UserCallback: it runs in the Train controller (on the driver's node) and
sees every report of rank 0 and every worker-group failure. After a restore the steps between the
checkpoint and the failure are trained again; their first rows are replaced, not duplicated, in
metrics.jsonl and TensorBoard (MLflow keeps both values of such a step: its history is append-only).
It prints nothing: the driver shows the run from these files (train/progress.py).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from hdpo_ray.config import Config, flatten
from hdpo_ray.storage import atomic_write_lines

RESTORED_KEY = "restored_from_step"  # in the first report after a restore (train/loop.py)
CHECKPOINT_ONLY_KEY = "checkpoint_only"  # a report that carries a checkpoint and no metrics
NOTICE_KEY = "notice"  # a line for the user from rank 0 (its own output reaches the driver only with --verbose)


def last_logged_step(path: Path) -> int:
    """The highest step in a metrics.jsonl (0 if none): an earlier driver of the same run wrote it."""
    if not path.exists():
        return 0
    return max((json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()), default=0)


def drop_rows_from(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl without rows at `step` or later; those steps are being trained again."""
    if path.exists():
        kept = [
            line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) < step
        ]
        atomic_write_lines(path, kept)


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(row: dict[str, Any], total_steps: int, elapsed: float, eta: float) -> str:
    parts = [f"step {row['step']}/{total_steps}"]
    if "loss" in row:
        parts += [
            f"loss {row['loss']:.4f}",
            f"acc {row['rewards/accuracies']:.2f}",
            f"margin {row['rewards/margins']:+.4f}",
            f"{row['tokens_per_s']:,.0f} tok/s",
        ]
    if "eval/loss" in row:
        parts.append(f"eval loss {row['eval/loss']:.4f} acc {row['eval/rewards/accuracies']:.2f}")
    skipped = row.get("nonfinite/skipped_batches", 0) + row.get("nonfinite/skipped_steps", 0)
    if skipped:
        parts.append(
            f"non-finite skipped {row['nonfinite/skipped_batches']:.0f} batches "
            f"{row['nonfinite/skipped_steps']:.0f} steps"
        )
    parts.append(f"elapsed {_clock(elapsed)} ETA {_clock(eta)}")
    return "[hdpo-ray] " + " | ".join(parts)


def start_mlflow_run(config: Config, output_dir: str, run_name: str, run_id: str | None) -> str | None:
    """The MLflow run of this training run: `run_id` again when resuming, else a new one with the config as params."""
    if not config.logging.mlflow_uri:
        return None
    client = mlflow_client(config.logging.mlflow_uri)
    if run_id:
        client.update_run(run_id, status="RUNNING")
        return run_id
    experiment = client.get_experiment_by_name(config.logging.mlflow_experiment)
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment(config.logging.mlflow_experiment)
    )
    run = client.create_run(experiment_id, run_name=run_name, tags={"hdpo_ray.output_dir": output_dir})
    from mlflow.entities import Param

    params = [Param(key, json.dumps(value)[:6000]) for key, value in flatten(config.to_dict()).items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    return run.info.run_id


def end_mlflow_run(config: Config, run_id: str | None, status: str) -> None:
    if run_id:
        mlflow_client(config.logging.mlflow_uri).set_terminated(run_id, status=status)


def mlflow_client(uri: str):
    """A client for logging.mlflow_uri (local paths already made absolute file: URIs by the config)."""
    if uri.startswith("file:"):
        # The user chose a file store on purpose; MLflow 3 refuses one unless told so.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class RunTracker(UserCallback):
    """Writes what rank 0 reports (metrics.jsonl, TensorBoard, MLflow) and what fails (events.jsonl). Plain
    Python state: it is built on the driver and pickled to the Train controller."""

    def __init__(self, config: Config, output_dir: str, mlflow_run_id: str | None):
        self.config = config
        self.output_dir = output_dir
        self.mlflow_run_id = mlflow_run_id
        self.started = time.time()
        self.rows = Path(self.output_dir, "metrics.jsonl")
        self.last_step = last_logged_step(self.rows)
        self.failed_at: float | None = None
        self.tensorboard = None  # writers and clients are made on first use, in the controller (not pickled)
        self.purge_from: int | None = None  # the next TensorBoard writer hides earlier events from this step on
        self.writers = 0
        self.mlflow = None
        self.sink_errors: set[str] = set()

    def after_exception(self, run_context, worker_exceptions):
        self.failed_at = time.time()
        ranks = sorted(worker_exceptions)
        errors = {
            str(rank): (f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0])[:300]
            for rank, e in sorted(worker_exceptions.items())
        }
        self._event({"event": "worker_failure", "ranks": ranks, "last_step": self.last_step, "errors": errors})

    def after_report(self, run_context, metrics, checkpoint):
        row = dict(metrics[0]) if metrics else {}
        step = int(row.get("step", 0))
        if RESTORED_KEY in row:
            self._restored(int(row.pop(RESTORED_KEY)))
        elif self.failed_at is not None:  # a new attempt with no checkpoint to restore starts from step 0
            self._restored(0)
        if NOTICE_KEY in row:
            self._event({"event": "notice", "text": str(row.pop(NOTICE_KEY))})
        if row.pop(CHECKPOINT_ONLY_KEY, False):
            return
        row["time"] = round(time.time() - self.started, 2)
        if step <= self.last_step:  # a replayed step whose first row was written before the failure
            drop_rows_from(self.rows, step)
            self.purge_from = step
        with open(self.rows, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.last_step = step
        self._guarded("tensorboard", self._tensorboard_scalars, row, step)
        if self.mlflow_run_id:
            self._guarded("mlflow", self._mlflow_scalars, row, step)

    def _restored(self, from_step: int) -> None:
        recomputed = max(0, self.last_step - from_step)
        if recomputed:  # the rows of the steps trained again go before the event says so (the driver's display)
            drop_rows_from(self.rows, from_step + 1)
            self.purge_from, self.last_step = from_step + 1, last_logged_step(self.rows)
        event = {"event": "restored", "from_step": from_step, "steps_recomputed": recomputed}
        if self.failed_at is not None:
            # failure noticed -> first step after the restore
            event["recovery_s"] = round(time.time() - self.failed_at, 2)
        self._event(event)
        self.failed_at = None

    def _event(self, event: dict) -> None:
        with open(Path(self.output_dir, "events.jsonl"), "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **event}) + "\n")

    def _guarded(self, sink: str, write, row: dict, step: int) -> None:
        """A TensorBoard or MLflow write that fails (a full disk, an MLflow server away) costs its row, not the
        run: an exception here would end the Train controller. Said once per sink, and in events.jsonl."""
        try:
            write(row, step)
        except Exception as err:  # noqa: BLE001
            if sink not in self.sink_errors:
                self.sink_errors.add(sink)
                self._event({"event": f"{sink}_error", "step": step, "error": f"{type(err).__name__}: {err}"[:300]})

    @staticmethod
    def _scalars(row: dict) -> dict[str, float]:
        return {
            k: v
            for k, v in row.items()
            if k not in ("step", "epoch", "time") and isinstance(v, (int, float)) and math.isfinite(v)
        }

    def _tensorboard_scalars(self, row: dict, step: int) -> None:
        if not self.config.logging.tensorboard:
            return
        if self.tensorboard is None or self.purge_from is not None:
            from tensorboardX import SummaryWriter

            if self.tensorboard is not None:
                self.tensorboard.close()
            # purge_step: TensorBoard hides the earlier events of this logdir from that step on. The suffix keeps
            # two writers opened in the same second (files are named by the second) from overwriting each other.
            self.writers += 1
            suffix = f".{os.getpid()}.{self.writers}"
            self.tensorboard = SummaryWriter(
                logdir=str(Path(self.output_dir, "tensorboard")), purge_step=self.purge_from, filename_suffix=suffix
            )
            self.purge_from = None
        for key, value in self._scalars(row).items():
            self.tensorboard.add_scalar(key, value, step)
        self.tensorboard.flush()  # one report every logging_steps: cheap, and the board stays current

    def _mlflow_scalars(self, row: dict, step: int) -> None:
        from mlflow.entities import Metric

        self.mlflow = self.mlflow or mlflow_client(self.config.logging.mlflow_uri)
        stamp = int(time.time() * 1000)
        self.mlflow.log_batch(
            self.mlflow_run_id,
            metrics=[Metric(key, float(value), stamp, step) for key, value in self._scalars(row).items()],
        )
