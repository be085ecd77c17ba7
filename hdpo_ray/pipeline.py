"""`hdpo-ray train` end to end: Ray -> prepared data -> TorchTrainer -> OUTPUT_DIR/final."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from hdpo_ray.capacity import held
from hdpo_ray.config import Config, first_difference, run_identity
from hdpo_ray.data.prepare import EncodedSplit, PreparedSplit
from hdpo_ray.errors import UserError
from hdpo_ray.runtime import init_ray
from hdpo_ray.shared_storage import check_shared, run_paths
from hdpo_ray.train.trainer import TrainResult, finish, fit, training_phases

log = logging.getLogger("hdpo_ray")
# What a run writes into its output_dir (the reference cache under prepared/ is keyed by content and kept).
RUN_FILES = ("run.json", "config.json", "data_report.json", "metrics.jsonl", "events.jsonl")
RUN_DIRS = ("tensorboard", "checkpoints", "final", "adapter", "eval")


class OutputDirError(UserError):
    """An output_dir that holds another run; one line saying how to proceed."""


@dataclass
class PreparedData:
    train: PreparedSplit
    eval: PreparedSplit | None
    eval_encoded: EncodedSplit | None  # the eval split's tokenized pairs (prompts for sampling)

    @property
    def reference_forward_pairs(self) -> int:
        return self.train.reference_forward_pairs + (self.eval.reference_forward_pairs if self.eval else 0)


def reference_device_warning(config: Config) -> str | None:
    """One line when the reference pool was set to CPU while training runs on GPUs (the user may not know)."""
    if config.train.use_gpu and not config.reference.num_gpus_per_actor:
        return (
            "the reference pool runs on CPU (reference.num_gpus_per_actor=0) beside GPU training: a large model's "
            "reference pass will be slow; leave the key unset for one GPU per reference actor"
        )
    return None


def prepare_data(config: Config, output_dir: str, *, stream: bool = True) -> PreparedData:
    """Read, validate and tokenize every split, then attach reference log-probs; writes data_report.json.

    stream=False always goes through the reference cache (a sweep's trials all read it).
    """
    from hdpo_ray.data.prepare import DataError, encode_split, score_split

    report_file = Path(output_dir, "data_report.json")
    report_file.unlink(missing_ok=True)
    encoded = {}
    try:  # validate every split before any reference forward pass is spent
        for split, specs in (("train", config.data.train_files), ("eval", config.data.eval_files)):
            if specs:
                encoded[split] = encode_split(config, specs, split)
    except DataError as err:  # invalid rows in error mode: still say which rows, all of them, before stopping
        reports = {name: e.report for name, e in encoded.items()} | (err.report or {})
        report_file.write_text(json.dumps({"on_invalid": config.data.on_invalid, "stopped": True} | reports, indent=2))
        raise
    if warning := reference_device_warning(config):
        log.warning(warning)
    train_split = score_split(config, encoded["train"], stream=stream)
    eval_split = score_split(config, encoded["eval"], stream=False) if "eval" in encoded else None
    report = {"on_invalid": config.data.on_invalid, "stopped": False, "train": train_split.report} | (
        {"eval": eval_split.report} if eval_split else {}
    )
    report_file.write_text(json.dumps(report, indent=2))
    return PreparedData(train_split, eval_split, encoded.get("eval"))


def run_training(config: Config, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """`hdpo-ray train`: resume is --resume (the run's own config, overrides on top), overwrite is --overwrite."""
    started = time.perf_counter()
    output_dir = os.path.abspath(config.output_dir)
    claim_output_dir(config, output_dir, resume=resume, overwrite=overwrite)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    Path(output_dir, "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    init_ray(config)
    with held(training_phases(config), config.cluster.autoscaling, config.cluster.wait_for_resources_s):
        check_shared(run_paths(config))
        data = prepare_data(config, output_dir)
        result, total_steps, state = fit(config, data.train, data.eval)
        final = finish(config, result, total_steps, state)
    metrics = last_metrics(Path(output_dir, "metrics.jsonl"))
    return TrainResult(
        output_dir, final, metrics, total_steps, data.reference_forward_pairs, time.perf_counter() - started
    )


def claim_output_dir(config: Config, output_dir: str, *, resume: bool, overwrite: bool) -> None:
    """One run per output_dir, never mixed or lost: an unfinished run there continues only with the same config
    (or with --resume); a finished or stopped one is kept unless --overwrite, which removes its files first."""
    from hdpo_ray.train.trainer import read_run_state

    state = read_run_state(output_dir)
    if state is None or resume:
        return
    if overwrite:
        for name in RUN_FILES:
            Path(output_dir, name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(Path(output_dir, name), ignore_errors=True)
        log.info("--overwrite: removed run %s from %s", state.get("name"), output_dir)
        return
    how = "set another output_dir, or add --overwrite to replace it"
    if state.get("status") != "running":
        cont = f"continue it with `hdpo-ray train --resume {output_dir}`, " if state.get("status") == "stopped" else ""
        raise OutputDirError(f"{output_dir} holds run {state.get('name')}, {state.get('status')}; {cont}{how}")
    saved_file = Path(output_dir, "config.json")
    saved = run_identity(json.loads(saved_file.read_text())) if saved_file.is_file() else {}
    now = run_identity(config.to_dict())
    changed = first_difference(saved, now)
    if changed:
        raise OutputDirError(
            f"{output_dir} holds the unfinished run {state.get('name')} with another config ({changed}: "
            f"{saved.get(changed)!r} there, {now.get(changed)!r} now); continue it as it was with `hdpo-ray train "
            f"--resume {output_dir}`, {how}"
        )


def last_metrics(path: Path) -> dict:
    """The last logged train metrics merged with the last eval metrics."""
    merged: dict = {}
    if path.exists():
        for line in path.read_text().splitlines():
            merged.update(json.loads(line))
    return merged
