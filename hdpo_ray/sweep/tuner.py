"""`hdpo-ray sweep`: one reference pass, then one Ray Tune trial per (alpha, beta, lr), each a Ray Train run.

Driver:  prepare the data once (read -> validate -> tokenize -> reference log-probs, all cached)
         -> Tuner over the grid (or Tuner.restore of the same sweep: finished trials are not rerun)
         -> results.csv, results.md, alpha_sweep.png, best.json (hdpo_ray.sweep.results)
Trial:   TorchTrainer.fit on the cached pairs, reporting to Tune through TuneReportCallback
         -> export -> both entropy measures on a Ray task -> eval.tasks, if any (hdpo_ray.eval)
         -> OUTPUT_DIR/trials/<name>/summary.json

The reference log-probs do not depend on alpha, beta or the learning rate, so the trials only read
them: the reference model runs once per pair for the whole sweep.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hdpo_ray.capacity import DATA_CPUS, Phase, held
from hdpo_ray.config import Config, ConfigError, first_difference, run_identity
from hdpo_ray.shared_storage import check_shared, run_paths
from hdpo_ray.storage import atomic_write
from hdpo_ray.sweep.grid import TRIALS_DIR, trial_config, trial_grid, trial_name
from hdpo_ray.train.trainer import training_phases, worker_group

log = logging.getLogger("hdpo_ray")
TUNE_DIR = "tune"
TRIAL_MEMORY = 256 * 2**20  # bytes Tune reserves for a trial's own process
SUMMARY = "summary.json"  # written last by a finished trial
# Keys reported during training that compare across alphas; entropy keys exist only after training.
EARLY_STOPPING_METRICS = ("eval/policy_accuracy", "eval/logps/chosen", "eval/entropy")


def concurrent_trials(config: Config, cluster: dict[str, float]) -> int:
    """sweep.max_concurrent_trials, or as many trials as the cluster holds side by side (one CPU kept for Ray Data)."""
    workers = worker_group(config)
    spare = {
        resource: cluster.get(resource, 0.0) - (DATA_CPUS if resource == "CPU" else 0.0) for resource in workers.bundle
    }
    fit = min(math.floor((spare[r] + 1e-9) / workers.total(r)) for r, amount in workers.bundle.items() if amount)
    return max(1, min(fit, config.sweep.max_concurrent_trials or fit))


def _check_sweep(config: Config) -> None:
    from hdpo_ray.eval.runner import selectable_task_metrics
    from hdpo_ray.sweep.results import SELECTABLE_METRICS

    sweep = config.sweep
    if not config.data.eval_files:
        raise ConfigError(
            "a sweep needs data.eval_files: the selection metric and the entropy measures use held-out pairs"
        )
    task_metrics = selectable_task_metrics(config.eval)
    if sweep.metric not in SELECTABLE_METRICS and sweep.metric not in task_metrics:
        example = task_metrics[0] if task_metrics else "gsm8k/pass@1/t=1 with eval.tasks=[gsm8k]"
        raise ConfigError(
            f"sweep.metric {sweep.metric!r} is not one of {', '.join(SELECTABLE_METRICS)}, nor a metric of "
            f"eval.tasks (e.g. {example})"
        )
    if config.eval.tasks:  # a bad eval plan (task data, backend) fails now, not after every trial has trained
        from hdpo_ray.eval.runner import plan_eval

        plan_eval(config, list(dict.fromkeys(config.eval.tasks)))
    if sweep.early_stopping and (sweep.metric not in EARLY_STOPPING_METRICS or not config.train.eval_steps):
        raise ConfigError(
            "sweep.early_stopping needs train.eval_steps > 0 and sweep.metric in "
            f"{', '.join(EARLY_STOPPING_METRICS)} (reported at every evaluation)"
        )


def _claim_output_dir(config: Config, output_dir: Path) -> dict:
    """sweep.json pins the sweep to its output_dir: rerunning the same config resumes it, another config is refused."""
    state_file = output_dir / "sweep.json"
    # Tuner.restore keeps the first TuneConfig, concurrency included;
    # where the metrics are also sent is not the sweep's identity
    identity = run_identity(config.to_dict())
    if state_file.exists():
        state = json.loads(state_file.read_text())
        changed = first_difference(state["config"], identity)
        if changed:
            raise ConfigError(
                f"{output_dir} holds a sweep with a different config ({changed}: "
                f"{state['config'].get(changed)!r} there, {identity.get(changed)!r} now); rerun with the "
                "same config to resume it, or set another output_dir"
            )
        return state
    return {"config": identity, "invocations": []}


@dataclass(frozen=True)
class SweepInputs:
    """What every trial reads, bound to the trainable with tune.with_parameters: the base config, the sweep's
    output_dir and the prepared cache entries with their pair counts."""

    config: dict
    output_dir: str
    train_entry: str
    train_pairs: int
    eval_entry: str
    eval_pairs: int
    eval_encoded_entry: str  # the eval split's tokenized pairs: the entropy measures' prompts


def run_trial(point: dict, inputs: SweepInputs) -> None:
    """Ray Tune function trainable: one Ray Train run (TorchTrainer) for one point {alpha, beta, lr} of the
    grid, then its entropy measures and eval tasks; reports the trial's row and writes it to summary.json."""
    import ray.tune

    from hdpo_ray.pipeline import last_metrics
    from hdpo_ray.runtime import configure_ray_data
    from hdpo_ray.sweep.results import trial_row

    params = {k: point[k] for k in ("alpha", "beta", "lr")}
    config = trial_config(Config.model_validate(inputs.config), params, inputs.output_dir)
    trial_dir = Path(config.output_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    summary_file = trial_dir / SUMMARY
    if summary_file.exists():  # finished in an earlier invocation whose Tune state did not record it
        ray.tune.report(json.loads(summary_file.read_text()))
        return
    started = time.time()
    configure_ray_data()  # rows in order: alpha (beta, lr) is what differs between trials
    final, steps = _train_trial(config, inputs, trial_dir)
    entropy = _measure_entropy(config, final, inputs.eval_encoded_entry)
    task_metrics = _evaluate_tasks(config, final, trial_dir) if config.eval.tasks else {}
    row = trial_row(
        params,
        last_metrics(trial_dir / "metrics.jsonl"),
        entropy | task_metrics,
        steps=steps,
        wall_s=time.time() - started,
        final_model=final,
        status="finished",
    )
    row["tokens_per_s"] = _mean_throughput(trial_dir / "metrics.jsonl")
    atomic_write(summary_file, json.dumps(row, indent=2))  # a summary is complete or absent
    ray.tune.report(row)


def _train_trial(config: Config, inputs: SweepInputs, trial_dir: Path) -> tuple[str, int]:
    """(final model directory, steps): the trial's Ray Train run, reporting to Tune, unless an earlier
    invocation already trained and exported it."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from hdpo_ray.data.cache import read_entry
    from hdpo_ray.data.prepare import PreparedSplit
    from hdpo_ray.train.trainer import finish, fit, read_run_state, total_optimizer_steps

    run_state = read_run_state(str(trial_dir)) or {}
    final = str(trial_dir / "final")
    if run_state.get("status") == "finished" and Path(final, "config.json").exists():
        return final, run_state["steps"]  # trained and exported before an interruption: only the measures are missing
    report = _report_to_tune(TuneReportCallback, total_optimizer_steps(config, inputs.train_pairs))
    train = PreparedSplit(read_entry(inputs.train_entry), inputs.train_pairs, {}, 0, inputs.train_entry)
    held_out = PreparedSplit(read_entry(inputs.eval_entry), inputs.eval_pairs, {}, 0, inputs.eval_entry)
    result, steps, state = fit(config, train, held_out, callbacks=(report,))
    return finish(config, result, steps, state), steps


def _measure_entropy(config: Config, final: str, eval_encoded_entry: str) -> dict[str, float]:
    """Both entropy measures of the trial's final model, on this trial's node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On this trial's node, where final/ was just written, and outside the trial's placement group
    # (Tune sized that for the trial process alone). Soft: a node that cannot hold it (a CPU head node,
    # the task asking for a GPU) gives way to one that can, which then reads final/ from shared storage.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return entropy_on_ray(config, final, eval_encoded_entry, scheduling_strategy=here)


def entropy_on_ray(config: Config, model: str, eval_encoded_entry: str, **options) -> dict[str, float]:
    """measure_policy_entropy of a model on a Ray task sized like a trial's training workers (free again by
    then), with the sweep's prompts, tokens and seed; options: more Ray task options."""
    import ray

    from hdpo_ray.sweep.entropy import measure_policy_entropy

    train, sweep = config.train, config.sweep
    cpus = train.num_workers * train.cpus_per_worker
    measure = ray.remote(measure_policy_entropy).options(num_cpus=cpus, num_gpus=1 if train.use_gpu else 0, **options)
    return ray.get(
        measure.remote(
            model,
            eval_encoded_entry,
            num_prompts=sweep.entropy_prompts,
            max_new_tokens=sweep.entropy_max_new_tokens,
            seed=sweep.entropy_seed,
            use_gpu=train.use_gpu,
            torch_threads=train.torch_threads or max(1, int(cpus)),
        )
    )


def _evaluate_tasks(config: Config, final: str, trial_dir: Path) -> dict[str, float]:
    """eval.tasks on the trial's final model, sampled preferably on this node; an earlier
    invocation's complete results are reused."""
    import ray

    from hdpo_ray.eval.report import RESULTS_FILE
    from hdpo_ray.eval.runner import run_eval

    done = trial_dir / "eval" / RESULTS_FILE  # written last, whole, by run_eval; sweep.json pins the config
    if done.exists():
        return json.loads(done.read_text())["metrics"]
    results = run_eval(
        config,
        final,
        tasks=list(dict.fromkeys(config.eval.tasks)),
        output_dir=str(done.parent),
        node_id=ray.get_runtime_context().get_node_id(),
        hold=False,
    )
    return results["metrics"]


def without_final_eval(row: dict[str, Any], total_steps: int) -> dict[str, Any]:
    """The last step's report without its eval/ metrics: Tune's scheduler must not stop a trial that has
    trained to the end but not yet exported its model (the trial's final tune.report carries them)."""
    return {k: v for k, v in row.items() if not k.startswith("eval/")} if row.get("step", 0) >= total_steps else row


def _report_to_tune(base: type, total_steps: int):
    """A TuneReportCallback (passed as `base`, importable only inside a Tune session) that
    applies without_final_eval."""

    class ReportToTune(base):
        def after_report(self, run_context, metrics, checkpoint):
            super().after_report(run_context, [without_final_eval(m, total_steps) for m in metrics], checkpoint)

    return ReportToTune()


def _mean_throughput(path: Path) -> float:
    values = [row["tokens_per_s"] for row in map(json.loads, path.read_text().splitlines()) if "tokens_per_s" in row]
    return sum(values) / len(values) if values else float("nan")


def _tuner(config: Config, output_dir: Path, inputs: SweepInputs, concurrency: int, total_steps: int):
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from hdpo_ray.runtime import verbose
    from hdpo_ray.sweep.display import TrialLines

    # A trial's own process only waits on its TorchTrainer: the workers, Ray Data and the entropy task
    # ask for their resources themselves, so the trial takes no CPU (a CPU held here would starve Ray
    # Data's tasks) and max_concurrent_trials packs them. Tune refuses an empty request: memory.
    trainable = tune.with_resources(tune.with_parameters(run_trial, inputs=inputs), {"CPU": 0, "memory": TRIAL_MEMORY})
    path = str(output_dir / TUNE_DIR)
    if tune.Tuner.can_restore(path):
        log.info(
            "resuming the sweep in %s: finished trials are kept, unfinished ones continue from their checkpoints", path
        )
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    scheduler = early_stopping_scheduler(config, total_steps)
    axes = {key: sorted({p[key] for p in trial_grid(config)}) for key in ("alpha", "beta", "lr")}
    return tune.Tuner(
        trainable,
        param_space={key: tune.grid_search(values) for key, values in axes.items()},  # the same points as trial_grid
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrency,
            scheduler=scheduler,
            trial_name_creator=_tune_trial_name,
            trial_dirname_creator=_tune_trial_name,
        ),
        # A line per trial start and end (Tune's status tables with --verbose). Tune's own result.json and
        # progress.csv per trial, not its TensorBoard logger (each trial's run writes TensorBoard itself; Tune's
        # warned on every '@' and '=').
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=str(output_dir),
            verbose=1 if verbose() else 0,
            callbacks=[JsonLoggerCallback(), CSVLoggerCallback()]
            + ([] if verbose() else [TrialLines(config.sweep.metric, len(trial_grid(config)))]),
        ),
    )


def early_stopping_scheduler(config: Config, total_steps: int):
    """ASHA on sweep.metric over optimizer steps (reported at each evaluation), or None."""
    from ray.tune.schedulers import ASHAScheduler

    sweep = config.sweep
    if not sweep.early_stopping:
        return None
    # Rungs strictly before the last step, and stop_last_trials off: a trial that reaches its last
    # report must live on to export its model and measure its entropy.
    grace = max(1, min(sweep.grace_steps or config.train.eval_steps, total_steps - 1))
    return ASHAScheduler(
        time_attr="step",
        metric=sweep.metric,
        mode=sweep.mode,
        max_t=total_steps,
        grace_period=grace,
        reduction_factor=2,
        stop_last_trials=False,
    )


def reference_entropy(config: Config, output_dir: Path, eval_encoded_entry: str) -> dict[str, float]:
    """Both entropy measures of the reference model on the trials' prompts and seed: where every alpha started.

    Measured once per sweep directory (reference_entropy.json), on a Ray task sized like a trial's workers.
    """
    saved = output_dir / "reference_entropy.json"
    if saved.exists():
        return json.loads(saved.read_text())
    entropy = entropy_on_ray(config, config.model.reference, eval_encoded_entry)
    atomic_write(saved, json.dumps(entropy, indent=2))
    return entropy


def _tune_trial_name(trial) -> str:
    return trial_name(trial.config)


def _run_trials(config: Config, output_dir: Path, state: dict) -> tuple[Any, Any]:
    """One reference pass for the whole sweep, then the Tuner over the grid: (Tune's ResultGrid, the prepared data)."""
    import ray

    from hdpo_ray.pipeline import prepare_data
    from hdpo_ray.train.trainer import total_optimizer_steps

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # eval metrics arrive only at evaluations
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # the loggers are chosen in _tuner
    data = prepare_data(config, str(output_dir), stream=False)
    state["invocations"].append(
        {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "reference_forward_pairs": data.reference_forward_pairs}
    )
    (output_dir / "sweep.json").write_text(json.dumps(state, indent=2))
    inputs = SweepInputs(
        config=config.to_dict(),
        output_dir=str(output_dir),
        train_entry=data.train.cache_entry,
        train_pairs=data.train.num_pairs,
        eval_entry=data.eval.cache_entry,
        eval_pairs=data.eval.num_pairs,
        eval_encoded_entry=data.eval_encoded.entry,
    )
    grid = trial_grid(config)
    concurrency = concurrent_trials(config, ray.cluster_resources())
    total_steps = total_optimizer_steps(config, data.train.num_pairs)
    log.info(
        "sweep: %d trials (%s), %d at a time, %d steps each; reference log-probs for %d pairs shared by all",
        len(grid),
        ", ".join(map(trial_name, grid)),
        concurrency,
        total_steps,
        data.train.num_pairs + data.eval.num_pairs,
    )
    from hdpo_ray.sweep.display import tune_output_engine

    with tune_output_engine():
        return _tuner(config, output_dir, inputs, concurrency, total_steps).fit(), data


def run_sweep(config: Config) -> dict[str, Any]:
    """The whole sweep; returns {"rows", "best", "reference_forward_pairs", "wall_s"} and writes the result files."""
    from hdpo_ray.runtime import init_ray
    from hdpo_ray.sweep.results import write_results

    started = time.time()
    _check_sweep(config)
    output_dir = Path(os.path.abspath(config.output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    state = _claim_output_dir(config, output_dir)
    (output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    init_ray(config)
    phases = training_phases(config, stream=False)  # one trial must fit; the trials never stream the reference pool
    if config.eval.tasks:  # the eval pool must fit too, checked now, not after every trial has trained
        from hdpo_ray.eval.runner import eval_group

        phases.append(Phase((eval_group(config.eval),)))
    with held(phases, config.cluster.autoscaling, config.cluster.wait_for_resources_s):
        check_shared(run_paths(config, sweep=True))
        results, data = _run_trials(config, output_dir, state)
        rows, reference = _trial_rows(config, output_dir, results), _reference_summary(state, data)
        if not any(r["status"] == "interrupted" for r in rows):  # an interrupted sweep starts no new work
            reference["entropy"] = reference_entropy(config, output_dir, data.eval_encoded.entry)
    best = write_results(config, output_dir, rows, reference)
    return {
        "rows": rows,
        "best": best,
        "reference_forward_pairs": reference["forward_pairs"],
        "wall_s": time.time() - started,
    }


def _trial_rows(config: Config, output_dir: Path, results) -> list[dict[str, Any]]:
    """One row per grid point: a finished trial's summary, or its last metrics with why it has no summary."""
    from hdpo_ray.pipeline import last_metrics
    from hdpo_ray.sweep.results import trial_row

    errors = {trial_name(r.config): r.error for r in results if r.config and r.error}
    # Tune's own trial states (TERMINATED, ERROR, PENDING, RUNNING, PAUSED) tell an early stop from an interruption,
    # also for trials of an earlier invocation.
    states = {trial_name(t.config): t.status for t in _tune_trials(results)}
    rows = []
    for params in trial_grid(config):
        trial_dir = output_dir / TRIALS_DIR / trial_name(params)
        if (trial_dir / SUMMARY).exists():
            rows.append(json.loads((trial_dir / SUMMARY).read_text()))
            continue
        error = errors.get(trial_name(params))
        if error:
            status = f"error: {str(error).strip().splitlines()[-1][:200]}"
        elif states.get(trial_name(params)) == "TERMINATED" and config.sweep.early_stopping:
            status = "stopped early"
        else:
            status = "interrupted"
        rows.append(
            trial_row(
                params,
                last_metrics(trial_dir / "metrics.jsonl"),
                {},
                steps=None,
                wall_s=None,
                final_model=None,
                status=status,
            )
        )
    return rows


def _tune_trials(results) -> list:
    """The sweep's Tune trials with their states, read from Tune's experiment state (public API)."""
    from ray.tune import ExperimentAnalysis

    try:
        return ExperimentAnalysis(results.experiment_path, storage_filesystem=results.filesystem).trials
    except Exception:  # noqa: BLE001 -- no readable experiment state: every unfinished trial counts as interrupted
        return []


def _reference_summary(state: dict, data) -> dict[str, Any]:
    """The sweep's reference pass: pairs, forward passes over all invocations, the cache entries."""
    from hdpo_ray.data.cache import read_manifest

    # A sweep's splits always go through the cache; an entry removed since reads as None and is left out.
    cached = [m for m in (read_manifest(split.cache_entry) for split in (data.train, data.eval)) if m]
    return {
        "pairs": data.train.num_pairs + data.eval.num_pairs,
        "forward_pairs": sum(i["reference_forward_pairs"] for i in state["invocations"]),
        "this_run": data.reference_forward_pairs,
        "invocations": len(state["invocations"]),
        "entries": [{"entry": m["key"], "pairs": m["pairs"], "seconds": m["seconds"]} for m in cached],
    }
