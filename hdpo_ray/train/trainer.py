"""The driver side of training: resources, the TorchTrainer, progress and metrics.jsonl, the export.

`fit` and `finish` are what `hdpo-ray train` (hdpo_ray.pipeline.run_training, after the data is prepared)
and every sweep trial call: `fit` runs a Ray Train TorchTrainer whose workers run `train_loop_per_worker`,
`finish` copies the exported model from the final Ray Train checkpoint to OUTPUT_DIR/final.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hdpo_ray.capacity import DATA_GROUP, Group, Phase, ResourceError, check_fits
from hdpo_ray.config import Config, is_uri
from hdpo_ray.errors import Stopped
from hdpo_ray.storage import atomic_write, filesystem
from hdpo_ray.train.engine import ADAPTER_DIR, EXPORT_DIR
from hdpo_ray.train.progress import RunDisplay
from hdpo_ray.train.tracking import RunTracker, end_mlflow_run, start_mlflow_run

log = logging.getLogger("hdpo_ray")


class TrainingStopped(Stopped, RuntimeError):
    """The workers stopped the run on purpose (non-finite losses or gradients in a row); one line for the user."""


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
        raise ResourceError(
            f"{num_pairs} pairs over {train.num_workers} workers make no optimizer step; use fewer workers, a "
            "smaller batch or more data"
        )
    return steps


def worker_group(config: Config) -> Group:
    train = config.train
    bundle = {"CPU": train.cpus_per_worker, "GPU": 1.0 if train.use_gpu else 0.0, **train.resources_per_worker}
    hint = "lower train.cpus_per_worker (fractions are fine) or train.num_workers, or add nodes"
    return Group("training workers", train.num_workers, bundle, train.label_selector, hint)


def reference_group(config: Config) -> Group:
    ref = config.reference
    bundle = {"CPU": ref.num_cpus_per_actor, "GPU": ref.num_gpus_per_actor, **ref.resources}
    return Group(
        "reference pool",
        ref.num_actors,
        bundle,
        ref.label_selector,
        "lower reference.num_actors or its per-actor resources",
    )


def training_phases(config: Config, *, stream: bool = True) -> list[Phase]:
    """What a training run holds at once: the reference pass (with Ray Data), then the workers (with Ray
    Data); when the reference pool streams (reference.cache_dir null), all three together.

    stream=False: the reference pool never runs beside the workers (a sweep always caches its output).
    """
    workers, reference = worker_group(config), reference_group(config)
    phases = [Phase((workers, DATA_GROUP)), Phase((reference, DATA_GROUP))]
    if config.reference.cache_dir is None and stream:
        note = "reference.cache_dir is null, so the reference pool streams beside the training workers: "
        phases.append(Phase((workers, reference, DATA_GROUP), note, "or set a reference.cache_dir"))
    return phases


def check_resources(config: Config, cluster: dict[str, float], *, stream: bool = True) -> None:
    """Fail fast where Ray would wait forever: the workers and the reference pool must
    fit, with CPU left for Ray Data."""
    check_fits(training_phases(config, stream=stream), cluster)


def read_run_state(output_dir: str) -> dict[str, Any] | None:
    """OUTPUT_DIR/run.json: the Ray Train run name, its status (running, finished, stopped) and the MLflow run id."""
    state_file = Path(output_dir, "run.json")
    return json.loads(state_file.read_text()) if state_file.exists() else None


def write_run_state(output_dir: str, state: dict[str, Any]) -> None:
    atomic_write(Path(output_dir, "run.json"), json.dumps(state))  # a reader sees the old state or the new one


def _run_state(output_dir: str) -> dict[str, Any]:
    """Same output_dir and an unfinished run: the same name, so Ray Train resumes from its latest checkpoint."""
    state = read_run_state(output_dir)
    if state and state.get("status") == "running":
        _refuse_if_driven(state, output_dir)
        log.info("resuming run %s from its latest checkpoint", state["name"])
        return state | {"driver": _this_driver()}
    Path(output_dir, "metrics.jsonl").unlink(missing_ok=True)  # a new run starts new metrics and events
    Path(output_dir, "events.jsonl").unlink(missing_ok=True)
    shutil.rmtree(Path(output_dir, "tensorboard"), ignore_errors=True)
    return {"name": f"hdpo-{time.strftime('%Y%m%d-%H%M%S')}", "status": "running", "driver": _this_driver()}


def _this_driver() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _refuse_if_driven(state: dict[str, Any], output_dir: str) -> None:
    """Two drivers on one run would fight over its checkpoints (and the second would delete the first one's
    save in flight as unregistered): refuse while the recorded driver still runs on this host."""
    driver = state.get("driver") or {}
    pid = driver.get("pid")
    if driver.get("host") != socket.gethostname() or not pid or pid == os.getpid():
        return
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return  # gone
    if "hdpo" in command:
        raise ResourceError(
            f"run {state['name']} in {output_dir} is still being trained by process {pid} on this host; stop it "
            f"first (ray job stop, or kill {pid}) or use another output_dir"
        )


def fit(config: Config, train_split, eval_split, callbacks: tuple = ()) -> tuple[Any, int, dict[str, Any]]:
    """Build and fit the TorchTrainer; returns (Result, total steps, run state).
    `callbacks`: more Ray Train UserCallbacks."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from hdpo_ray.train.loop import train_loop_per_worker

    train = config.train
    total_steps = total_optimizer_steps(config, train_split.num_pairs)
    output_dir = os.path.abspath(config.output_dir)
    storage = train.storage_path or os.path.join(output_dir, "checkpoints")
    state = _run_state(output_dir)
    name = state["name"]
    storage = storage if is_uri(storage) else os.path.abspath(os.path.expanduser(storage))
    remove_unregistered_checkpoints(storage, name)
    state["mlflow_run_id"] = start_mlflow_run(config, output_dir, name, state.get("mlflow_run_id"))
    write_run_state(output_dir, state)
    datasets = {"train": rank_blocks(train_split.dataset, train)} | ({"eval": eval_split.dataset} if eval_split else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.to_dict(),
            "total_steps": total_steps,
            "num_eval_pairs": eval_split.num_pairs if eval_split else 0,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker, **train.resources_per_worker},
            placement_strategy=train.placement_strategy,
            label_selector=train.label_selector or None,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            callbacks=[RunTracker(config, output_dir, state["mlflow_run_id"]), *callbacks],
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if train.use_gpu else "cpu"}},
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=_ordered_ingest()),
    )
    workers = f"{train.num_workers} worker{'s' if train.num_workers > 1 else ''}"
    log.info(
        "training: %d steps on %s (ZeRO-%d), %d train pairs, run %s, checkpoints in %s",
        total_steps,
        workers,
        train.zero_stage,
        train_split.num_pairs,
        name,
        storage,
    )
    try:
        with RunDisplay(output_dir, total_steps):
            return trainer.fit(), total_steps, state
    except BaseException as err:  # the MLflow run says so; run.json stays "running": the same command resumes
        end_mlflow_run(config, state["mlflow_run_id"], "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise


def remove_unregistered_checkpoints(storage: str, name: str) -> list[str]:
    """Delete checkpoint folders of run `name` that Ray Train never registered: saves cut off by a dying driver.

    Ray Train records a checkpoint in checkpoint_manager_snapshot.json only after every rank has
    uploaded its part, and resumes only from what that file lists; a folder it does not list is an
    interrupted save, never read again, only taking space. Returns the folders removed.
    """
    import pyarrow.fs as pafs

    fs, root = filesystem(storage)
    run_dir = f"{root.rstrip('/')}/{name}"
    try:
        with fs.open_input_stream(f"{run_dir}/checkpoint_manager_snapshot.json") as f:
            snapshot = json.loads(f.read())
    except (FileNotFoundError, OSError, json.JSONDecodeError):
        return []  # nothing registered yet, or no snapshot to trust: leave the folder alone
    registered = {r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])}
    for result in [snapshot.get("latest_checkpoint_result"), *snapshot.get("pending_training_results", [])]:
        if isinstance(result, dict) and "checkpoint_dir_name" in result:
            registered.add(result["checkpoint_dir_name"])
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(run_dir)):
        if (
            info.type == pafs.FileType.Directory
            and info.base_name.startswith("checkpoint_")
            and info.base_name not in registered
        ):
            fs.delete_dir(info.path)
            removed.append(info.base_name)
            log.info("removed %s: an interrupted checkpoint save (not registered by Ray Train)", info.base_name)
    return removed


def finish(config: Config, result, total_steps: int, state: dict[str, Any]) -> str:
    """After fit(): the final model to OUTPUT_DIR/final and run.json marked finished -- or, when the workers
    stopped the run, run.json marked stopped and TrainingStopped raised."""
    output_dir = os.path.abspath(config.output_dir)
    stopped = (result.return_value or {}).get("stopped")
    if stopped:
        write_run_state(output_dir, state | {"status": "stopped", "reason": stopped})
        end_mlflow_run(config, state.get("mlflow_run_id"), "FAILED")
        raise TrainingStopped(stopped)
    final = export_final(result, output_dir)
    write_run_state(output_dir, state | {"status": "finished", "steps": total_steps})
    end_mlflow_run(config, state.get("mlflow_run_id"), "FINISHED")
    return final


def rank_blocks(dataset, train):
    """The training pairs cut into blocks of exactly the pairs one rank takes per optimizer step.

    Ray Train's equal split deals blocks, in order, to the rank that has had the fewest rows. Blocks as
    written by the reference pass have sizes that depend on the CPUs the cluster had then; blocks of one
    fixed size make the deal a pure function of the config: round robin, so optimizer step s trains on
    pairs [s*W*K, (s+1)*W*K) of the file order (W workers, K pairs per rank per step) on any cluster.
    """
    return dataset.repartition(
        target_num_rows_per_block=train.per_device_batch_size * train.gradient_accumulation_steps, strict=True
    )


def _ordered_ingest():
    """Ray Data options for both splits: blocks in file order. Each rank then sees the same training pairs
    in the same order every epoch and in every run, so a restore (or a resumed run) replays exactly: it
    skips the micro-batches its checkpoint had consumed, which are the very batches that were trained
    on. And every rank reads the (unsplit) eval split in the same order, which `evaluate` relies on
    when each rank scores every world_size-th batch."""
    import ray.train

    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True  # also turns off locality-based dispatch, which depends on timing
    return ingest


def export_final(result, output_dir: str) -> str:
    """Copy the Hugging Face model from the final checkpoint (local or cloud storage) to OUTPUT_DIR/final,
    and with LoRA the trained adapters to OUTPUT_DIR/adapter.

    Each is copied beside its target first and renamed into place: never a partial copy.
    """
    if result.checkpoint is None:
        raise RuntimeError("training finished without a final checkpoint")
    with result.checkpoint.as_directory() as directory:
        source = Path(directory, EXPORT_DIR)
        if not source.is_dir():
            raise RuntimeError(f"the final checkpoint {result.checkpoint.path} holds no exported model")
        for leftover in (p for name in ("final", "adapter") for p in Path(output_dir).glob(f".{name}.*-*")):
            shutil.rmtree(leftover, ignore_errors=True)  # .partial-PID / .old-PID: from an export cut short
        if Path(directory, ADAPTER_DIR).is_dir():
            _copy_into_place(Path(directory, ADAPTER_DIR), Path(output_dir, "adapter"))
        _copy_into_place(source, Path(output_dir, "final"))
    return str(Path(output_dir, "final"))


def _copy_into_place(source: Path, target: Path) -> None:
    """Copy beside `target`, then rename into place: a reader sees the old copy or the new one."""
    partial, previous = (
        target.with_name(f".{target.name}.partial-{os.getpid()}"),
        target.with_name(f".{target.name}.old-{os.getpid()}"),
    )
    shutil.copytree(source, partial)
    if target.exists():
        os.replace(target, previous)
    os.replace(partial, target)
    shutil.rmtree(previous, ignore_errors=True)
