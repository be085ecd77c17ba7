"""`hdpo-ray train` end to end: Ray -> prepared data -> TorchTrainer -> OUTPUT_DIR/final."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from hdpo_ray.capacity import held
from hdpo_ray.config import Config
from hdpo_ray.data.prepare import EncodedSplit, PreparedSplit, configure_ray_data
from hdpo_ray.shared_storage import check_shared, run_paths
from hdpo_ray.train.trainer import TrainResult, finish, fit, training_phases

log = logging.getLogger("hdpo_ray")


def init_ray(config: Config) -> None:
    """Join the cluster at RAY_ADDRESS if set (ray job submit, KubeRay), else start a local Ray
    whose dashboard listens on loopback only."""
    import ray

    if ray.is_initialized():
        return
    wanted = {
        "DS_ACCELERATOR": "cuda" if config.train.use_gpu else "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        # Read by every Ray Train controller this run starts (Tune trials' too), which inherit this runtime env.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(config.train.report_poll_s),
    }
    # where converted GGUF models live: the driver's choice holds for its workers
    if os.environ.get("HDPO_RAY_MODEL_CACHE"):
        wanted["HDPO_RAY_MODEL_CACHE"] = os.environ["HDPO_RAY_MODEL_CACHE"]
    if os.environ.get("RAY_ADDRESS"):
        # Ray's State API, used inside the run's actors (Ray Train's placement-group cleaner), finds its cluster
        # from RAY_ADDRESS, else by looking for a running GCS and failing when a machine runs more than one.
        wanted["RAY_ADDRESS"] = os.environ["RAY_ADDRESS"]
    env = {"env_vars": {k: v for k, v in wanted.items() if k not in _job_env_vars()}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=env, log_to_driver=True)
    else:
        # The dashboard process also serves the State API, which Ray Train's placement-group cleaner needs.
        ray.init(runtime_env=env, include_dashboard=True, dashboard_host="127.0.0.1", logging_level=logging.WARNING)
    configure_ray_data()


def _job_env_vars() -> dict[str, str]:
    """The env vars of the runtime env `ray job submit` gave this driver's job. Ray refuses to merge a driver's
    runtime env that sets one of them again, so the job's values win."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    return (job.get("runtime_env") or {}).get("env_vars") or {}


@dataclass
class PreparedData:
    train: PreparedSplit
    eval: PreparedSplit | None
    eval_encoded: EncodedSplit | None  # the eval split's tokenized pairs (prompts for sampling)

    @property
    def reference_forward_pairs(self) -> int:
        return self.train.reference_forward_pairs + (self.eval.reference_forward_pairs if self.eval else 0)


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
    train_split = score_split(config, encoded["train"], stream=stream)
    eval_split = score_split(config, encoded["eval"], stream=False) if "eval" in encoded else None
    report = {"on_invalid": config.data.on_invalid, "stopped": False, "train": train_split.report} | (
        {"eval": eval_split.report} if eval_split else {}
    )
    report_file.write_text(json.dumps(report, indent=2))
    return PreparedData(train_split, eval_split, encoded.get("eval"))


def run_training(config: Config) -> TrainResult:
    started = time.perf_counter()
    output_dir = os.path.abspath(config.output_dir)
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


def last_metrics(path: Path) -> dict:
    """The last logged train metrics merged with the last eval metrics."""
    merged: dict = {}
    if path.exists():
        for line in path.read_text().splitlines():
            merged.update(json.loads(line))
    return merged
