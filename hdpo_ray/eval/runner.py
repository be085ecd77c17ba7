"""`hdpo-ray eval` end to end: load tasks -> sample on a Ray Data actor pool -> score -> tables and plots.

Every (task, problem, temperature) row must come back with eval.num_samples completions (one at temperature
0, greedy) and every completion gets a score; a shortfall stops the run rather than shrinking a denominator
silently.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from hdpo_ray.capacity import Group, Phase, held, placement_options
from hdpo_ray.config import EVAL_TASKS, Config, EvalConfig
from hdpo_ray.errors import UserError

log = logging.getLogger("hdpo_ray")


class EvalOutputError(UserError):
    """The results folder asked for belongs to another model."""


def eval_output_dir(config: Config, model: str) -> str:
    """eval.output_dir, or a folder per model: OUTPUT_DIR/eval/<the model as given, "/" as "__"> (lm-eval-harness's
    naming), so evaluating a second model never replaces the first one's results. A folder that holds another
    model's results is refused."""
    import json

    from hdpo_ray.eval.report import RESULTS_FILE

    folder = config.eval.output_dir or str(Path(config.output_dir) / "eval" / model_folder_name(model))
    saved = Path(folder) / RESULTS_FILE
    if saved.is_file():
        previous = json.loads(saved.read_text()).get("model")
        if previous not in (model, _local_or_id(model)):
            chosen = (
                f"eval.output_dir {folder}"
                if config.eval.output_dir
                else f"{folder} (the folder named after this model)"
            )
            raise EvalOutputError(
                f"{chosen} holds the results of another model ({previous}); set eval.output_dir to another folder"
            )
    return folder


def model_folder_name(model: str) -> str:
    """The model as given as one folder name, "/" as "__"; a path that leaves the working directory ("..")
    by its absolute path, so that two models' names never differ only by the part left out."""
    name = os.path.normpath(model)
    if name == "." or name.startswith(".."):
        name = os.path.abspath(name)
    return name.strip("/").replace("/", "__")


def tasks_to_run(config: Config) -> list[str]:
    """eval.tasks, or all four when none are named (the `hdpo-ray eval` default)."""
    return list(dict.fromkeys(config.eval.tasks)) or list(EVAL_TASKS)


def selectable_task_metrics(e: EvalConfig) -> list[str]:
    """The task metrics a sweep can select on: pass@k for each eval.k, entropy and each
    task's own summary metrics, at each temperature."""
    from hdpo_ray.eval.report import metric_key
    from hdpo_ray.eval.tasks import get_task_class

    names = []
    for task in dict.fromkeys(e.tasks):
        metrics = [f"pass@{k}" for k in e.k] + ["entropy", *get_task_class(task).summary_metrics]
        names += [metric_key(task, m, t) for t in e.temperatures for m in metrics]
    return names


def eval_group(e: EvalConfig) -> Group:
    bundle = {"CPU": e.num_cpus_per_actor, "GPU": e.num_gpus_per_actor, **e.resources}
    return Group(
        "eval pool",
        e.num_actors,
        bundle,
        e.label_selector,
        "lower eval.num_actors or eval.num_cpus_per_actor / eval.num_gpus_per_actor",
    )


def plan_eval(config: Config, tasks: list[str]) -> tuple[str, dict[str, Any], dict[str, list]]:
    """What can be checked before any sampling: (backend, {task: Task}, {task: problems}). Reads and validates
    every task's data, so a sweep fails on a bad eval plan before it trains anything."""
    from hdpo_ray.eval.samplers import choose_backend
    from hdpo_ray.eval.tasks import get_task

    e = config.eval
    backend = choose_backend(e.backend, e.num_gpus_per_actor)
    options = {"humaneval": {"timeout_s": e.code_timeout_s, "memory_mb": e.code_memory_mb, "workers": e.code_workers}}
    task_objects = {name: get_task(name, **options.get(name, {})) for name in tasks}
    problems = {name: task.load(e.data.get(name), e.limit) for name, task in task_objects.items()}
    return backend, task_objects, problems


def _local_or_id(model: str) -> str:
    """An existing local path made absolute (actors may run elsewhere, in another working directory); ids unchanged."""
    path = os.path.expanduser(model)
    return os.path.abspath(path) if os.path.exists(path) else model


def run_eval(
    config: Config, model: str, *, tasks: list[str], output_dir: str, node_id: str | None = None, hold: bool = True
) -> dict[str, Any]:
    """Evaluate `model` (a directory, hub id or embedded id) on `tasks`; writes output_dir and
    returns results.json's content.

    node_id: sample on that node when it can hold the pool (where a sweep trial just wrote its model).
    hold=False: the caller already holds the cluster for the eval pool (a sweep trial: its sweep's driver
    asked for it, and a second request from here would replace the driver's with the autoscaler).
    """
    from hdpo_ray.models import model_fingerprint
    from hdpo_ray.runtime import init_ray

    e = config.eval
    started = time.time()
    model = _local_or_id(model)
    fingerprint = model_fingerprint(model)  # a model that is not there fails here, in one line
    backend, task_objects, problems = plan_eval(config, tasks)
    init_ray(config)
    holding = (
        held([Phase((eval_group(e),))], config.cluster.autoscaling, config.cluster.wait_for_resources_s)
        if hold
        else nullcontext()
    )
    with holding:
        return _sample_and_score(
            config, model, fingerprint, backend, task_objects, problems, output_dir, node_id, started
        )


def _sample_and_score(
    config: Config,
    model: str,
    fingerprint: str,
    backend: str,
    task_objects: dict,
    problems: dict,
    output_dir: str,
    node_id: str | None,
    started: float,
) -> dict[str, Any]:
    """Sample every (problem, temperature) on the actor pool, score the completions per task, write the results."""
    from hdpo_ray.eval.report import write_results

    samples = _sample(config, model, backend, problems, node_id)
    sampling_s = time.time() - started
    scored, tables, truncated = [], {}, {}
    for name, task in task_objects.items():
        records = _score_task(config.eval, task, problems[name], [s for s in samples if s["task"] == name])
        tables[name], truncated[name] = _task_table(config.eval, task, records)
        scored.extend(records)
    results = _results(config.eval, model, fingerprint, backend, task_objects, tables, truncated)
    results |= {"sampling_s": sampling_s, "scoring_s": time.time() - started - sampling_s}
    results["wall_s"] = time.time() - started
    write_results(results, scored, output_dir)
    return results


def _sample(config: Config, model: str, backend: str, problems: dict, node_id: str | None) -> list[dict[str, Any]]:
    """num_samples completions of every (task, problem, temperature), one when greedy; all of them, or RuntimeError."""
    from hdpo_ray.eval.samplers import SamplingPlan
    from hdpo_ray.eval.samplers.common import completions_per_prompt
    from hdpo_ray.eval.sampling import sample_completions

    e = config.eval
    rows = [
        {"task": name, "problem_id": p.id, "prompt": p.prompt, "temperature": t}
        for name, ps in problems.items()
        for p in ps
        for t in e.temperatures
    ]
    log.info(
        f"eval: {len(rows)} prompts ({', '.join(f'{n} {len(ps)}' for n, ps in problems.items())} problems x "
        f"{len(e.temperatures)} temperatures) x {e.num_samples} samples on {e.num_actors} {backend} actor(s)"
    )
    samples = sample_completions(
        rows,
        SamplingPlan.from_config(config, model),
        backend,
        num_actors=e.num_actors,
        num_cpus=e.num_cpus_per_actor,
        num_gpus=e.num_gpus_per_actor,
        node_id=node_id,
        placement=placement_options(e.resources, e.label_selector),
    )
    drawn = Counter((s["task"], s["problem_id"], s["temperature"], s["sample"]) for s in samples)
    wanted = {id(r): completions_per_prompt(e.num_samples, r["temperature"]) for r in rows}
    short = next(
        (
            (r["task"], r["problem_id"], r["temperature"])
            for r in rows
            if any(drawn[(r["task"], r["problem_id"], r["temperature"], i)] != 1 for i in range(wanted[id(r)]))
        ),
        None,
    )
    if short is not None or len(samples) != sum(wanted.values()):
        raise RuntimeError(
            f"sampling returned {len(samples)} completions for {len(rows)} prompts, {sum(wanted.values())} "
            f"expected (first incomplete: {short})"
        )
    return samples


def _score_task(e: EvalConfig, task, problems: list, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One task's samples in (problem, temperature, sample) order, each with its score."""
    order = {p.id: i for i, p in enumerate(problems)}
    by_id = {p.id: p for p in problems}
    mine = sorted(samples, key=lambda s: (order[s["problem_id"]], e.temperatures.index(s["temperature"]), s["sample"]))
    scores = task.score_many([(by_id[s["problem_id"]], s["completion"]) for s in mine])
    return [
        dict(
            s,
            category=by_id[s["problem_id"]].category,
            correct=bool(sc.correct),
            extracted=sc.extracted,
            details=sc.details,
        )
        for s, sc in zip(mine, scores, strict=True)
    ]


def _task_table(e: EvalConfig, task, records: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """(pass@k and entropy per temperature, prompts that were truncated) of one task's scored records."""
    from hdpo_ray.eval.report import aggregate

    table = {
        f"{t:g}": aggregate([r for r in records if r["temperature"] == t], e.k, task.summarize, greedy=t == 0)
        for t in e.temperatures
    }
    truncated = sum(
        r["prompt_truncated"] for r in records if r["sample"] == 0 and r["temperature"] == e.temperatures[0]
    )
    return table, truncated


def _results(
    e: EvalConfig, model: str, fingerprint: str, backend: str, task_objects: dict, tables: dict, truncated: dict
) -> dict[str, Any]:
    """results.json's content: the tables, their flat metrics and the whole sampling plan."""
    from hdpo_ray.eval.report import flat_metrics
    from hdpo_ray.eval.samplers.common import completions_per_prompt

    return {
        "model": model,
        "model_fingerprint": fingerprint,
        "backend": backend,
        "tasks": tables,
        "metrics": flat_metrics(tables),
        "truncated_prompts": truncated,
        "num_samples": e.num_samples,
        "samples_per_problem": {f"{t:g}": completions_per_prompt(e.num_samples, t) for t in e.temperatures},
        "k": e.k,
        "temperatures": e.temperatures,
        "top_p": e.top_p,
        "max_new_tokens": e.max_new_tokens,
        "max_prompt_length": e.max_prompt_length,
        "seed": e.seed,
        "limit": e.limit,
        "data": {name: e.data.get(name) or task.default_source for name, task in task_objects.items()},
    } | (
        {"greedy": "temperature 0: greedy decoding, one completion per problem, pass@k = pass@1"}
        if 0 in e.temperatures
        else {}
    )
