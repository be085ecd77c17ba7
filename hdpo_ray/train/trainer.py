"""The driver side of training: resources, the TorchTrainer, progress and metrics.jsonl, the export.

`run_training(config)` is what `hdpo-ray train` calls: it prepares the data (read, validate, tokenize,
reference log-probs), fits a Ray Train TorchTrainer whose workers run `train_loop_per_worker`, and
copies the exported model from the final Ray Train checkpoint to OUTPUT_DIR/final.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hdpo_ray.config import Config

# Ray Data's file listing runs as a task that asks for one whole CPU (Ray 2.60 gives it no knob), and
# reads/writes ask for READ_CPUS each: one CPU must stay free beside the workers or the reference pool,
# or the pipeline waits forever.
DATA_CPUS = 1.0
from hdpo_ray.train.engine import EXPORT_DIR

log = logging.getLogger("hdpo_ray")


class ResourceError(RuntimeError):
    """The cluster cannot hold what the run asks for; one line for the user."""


@dataclass
class TrainResult:
    output_dir: str
    final_model: str
    metrics: dict[str, Any]  # last logged metrics (train and eval)
    steps: int
    reference_forward_pairs: int
    wall_seconds: float


def total_optimizer_steps(config: Config, num_pairs: int) -> int:
    """train.max_steps, or the steps in train.epochs passes over num_pairs split across the workers.

    Ray Train's equal split gives every rank floor(num_pairs / num_workers) pairs per epoch (at most
    num_workers - 1 pairs per epoch go unused, so that ranks step together).
    """
    train = config.train
    if train.max_steps > 0:
        return train.max_steps
    micro_batches = math.ceil((num_pairs // train.num_workers) / train.per_device_batch_size)
    steps = math.floor(train.epochs * micro_batches / train.gradient_accumulation_steps)
    if steps < 1:
        raise ResourceError(f"{num_pairs} pairs over {train.num_workers} workers make no optimizer step; use fewer workers, a smaller batch or more data")
    return steps


def check_resources(config: Config, cluster: dict[str, float], *, stream: bool = True) -> None:
    """Fail fast where Ray would wait forever: workers and the reference pool must fit, with CPU left for Ray Data.

    stream=False: the reference pool never runs beside the workers (a sweep always caches its output).
    """
    train, ref = config.train, config.reference
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    need_cpu = train.num_workers * train.cpus_per_worker
    if need_cpu > cpus - DATA_CPUS + 1e-9:
        raise ResourceError(
            f"train.num_workers={train.num_workers} x train.cpus_per_worker={train.cpus_per_worker:g} needs {need_cpu:g} CPUs and Ray Data needs {DATA_CPUS:g} "
            f"beside them, but the cluster has {cpus:g}; lower train.cpus_per_worker (fractions are fine) or add nodes"
        )  # fmt: skip
    if train.use_gpu and train.num_workers > gpus:
        raise ResourceError(f"train.use_gpu with {train.num_workers} workers needs {train.num_workers} GPUs; the cluster has {gpus:g}")
    if ref.num_actors * ref.num_cpus_per_actor > cpus - DATA_CPUS + 1e-9 or ref.num_actors * ref.num_gpus_per_actor > gpus + 1e-9:
        raise ResourceError(
            f"reference pool of {ref.num_actors} actors x ({ref.num_cpus_per_actor:g} CPU, {ref.num_gpus_per_actor:g} GPU) plus {DATA_CPUS:g} CPU for Ray Data "
            f"does not fit the cluster ({cpus:g} CPU, {gpus:g} GPU); lower reference.num_actors or its per-actor resources"
        )  # fmt: skip
    if config.reference.cache_dir is None and stream:  # streaming: the pool runs beside the training workers
        if need_cpu + ref.num_actors * ref.num_cpus_per_actor > cpus - DATA_CPUS + 1e-9 or (train.num_workers if train.use_gpu else 0) + ref.num_actors * ref.num_gpus_per_actor > gpus + 1e-9:
            raise ResourceError("reference.cache_dir is null, so the reference pool streams beside the training workers, but both do not fit the cluster at once; set a cache_dir or lower their resources")


def _make_callback(output_dir: str, total_steps: int):
    from ray.train import UserCallback

    class ProgressAndMetrics(UserCallback):
        """Runs on the Train controller (the driver's node): metrics.jsonl, TensorBoard event files in
        OUTPUT_DIR/tensorboard (tensorboardX, which Ray Tune already depends on) and a progress line per report."""

        def __init__(self):
            self.started = time.time()
            self.first_step: tuple[int, float] | None = None
            self.writer = None

        def _tensorboard(self, row: dict, step: int) -> None:
            if self.writer is None:
                from tensorboardX import SummaryWriter

                self.writer = SummaryWriter(logdir=str(Path(output_dir, "tensorboard")))
            for key, value in row.items():
                if key not in ("step", "epoch", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()  # a report every logging_steps: cheap, and the dashboard is current

        def after_report(self, run_context, metrics, checkpoint):
            row = dict(metrics[0]) if metrics else {}
            step = int(row.get("step", 0))
            if len(row) <= 2:  # a checkpoint-only report
                return
            row["time"] = round(time.time() - self.started, 2)
            with open(Path(output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            self._tensorboard(row, step)
            now = time.time()
            self.first_step = self.first_step or (step, now)
            done, since = step - self.first_step[0], now - self.first_step[1]
            eta = since / done * (total_steps - step) if done > 0 else float("nan")
            parts = [f"step {step}/{total_steps}"]
            if "loss" in row:
                parts += [f"loss {row['loss']:.4f}", f"acc {row['rewards/accuracies']:.2f}", f"margin {row['rewards/margins']:+.4f}", f"{row['tokens_per_s']:,.0f} tok/s"]
            if "eval/loss" in row:
                parts.append(f"eval loss {row['eval/loss']:.4f} acc {row['eval/rewards/accuracies']:.2f}")
            parts.append(f"elapsed {_clock(now - self.started)} ETA {_clock(eta)}")
            print("[hdpo-ray] " + " | ".join(parts), flush=True)

    return ProgressAndMetrics()


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _run_name(output_dir: str) -> str:
    """Same output_dir and an unfinished run: the same name, so Ray Train resumes from its checkpoint."""
    state_file = Path(output_dir, "run.json")
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if state.get("status") != "finished":
            log.info("resuming run %s from its latest checkpoint", state["name"])
            return state["name"]
    name = f"hdpo-{time.strftime('%Y%m%d-%H%M%S')}"
    Path(output_dir, "metrics.jsonl").unlink(missing_ok=True)  # a new run starts a new metrics file
    state_file.write_text(json.dumps({"name": name, "status": "running"}))
    return name


def fit(config: Config, train_split, eval_split, callbacks: tuple = ()) -> tuple[Any, int, str]:
    """Build and fit the TorchTrainer; returns (Result, total steps, run name). `callbacks`: more Ray Train UserCallbacks."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from hdpo_ray.train.loop import train_loop_per_worker

    train = config.train
    total_steps = total_optimizer_steps(config, train_split.num_pairs)
    output_dir = os.path.abspath(config.output_dir)
    storage = train.storage_path or os.path.join(output_dir, "checkpoints")
    name = _run_name(output_dir)
    datasets = {"train": train_split.dataset} | ({"eval": eval_split.dataset} if eval_split else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "total_steps": total_steps, "num_eval_pairs": eval_split.num_pairs if eval_split else 0},
        scaling_config=ray.train.ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker={"CPU": train.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage if "://" in storage else os.path.abspath(os.path.expanduser(storage)),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            callbacks=[_make_callback(output_dir, total_steps), *callbacks],
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if train.use_gpu else "cpu"}},
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    log.info("training: %d steps on %d workers (ZeRO-%d), %d train pairs, run %s, checkpoints in %s", total_steps, train.num_workers, train.zero_stage, train_split.num_pairs, name, storage)
    return trainer.fit(), total_steps, name


def export_final(result, output_dir: str) -> str:
    """Copy the Hugging Face model from the final checkpoint (local or cloud storage) to OUTPUT_DIR/final."""
    target = Path(output_dir, "final")
    if result.checkpoint is None:
        raise RuntimeError("training finished without a final checkpoint")
    with result.checkpoint.as_directory() as directory:
        source = Path(directory, EXPORT_DIR)
        if not source.is_dir():
            raise RuntimeError(f"the final checkpoint {result.checkpoint.path} holds no exported model")
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target)
    return str(target)
