"""`hdpo-ray train|sweep|eval [--config FILE.yaml] [key=value ...]` and `hdpo-ray toy` (also `python -m hdpo_ray`).

Bad input -- an unknown key, a value out of range, a missing file, an invalid data row -- prints one
line `hdpo-ray: error: ...` and exits with status 2 (a hdpo_ray.errors.UserError); a run that stopped
itself (non-finite losses) says why the same way and exits with 1 (errors.Stopped); no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from hdpo_ray import __version__
from hdpo_ray.config import ConfigError, load_config
from hdpo_ray.errors import user_facing


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hdpo-ray", description="H-DPO training on Ray.")
    parser.add_argument("--version", action="version", version=f"hdpo-ray {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--help-config",
        action="store_true",
        help="list every config key with its type, allowed values, default and meaning, and how they layer",
    )
    common.add_argument("--verbose", action="store_true", help="show Ray's own logs and every worker's output")
    train = commands.add_parser(
        "train", parents=[common], help="train a policy with H-DPO (nothing given: the embedded demo)"
    )
    train.add_argument("--config", help="YAML file of config sections over the built-in defaults (see jobs/)")
    train.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help=(
            "continue the unfinished or stopped run in RUN_DIR (its OUTPUT_DIR) from its latest checkpoint, with its "
            "saved config.json (key=value overrides on top)"
        ),
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in OUTPUT_DIR (its metrics, events, checkpoints, final model) with a new one",
    )
    train.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides with YAML values, e.g. loss.alpha=0.9"
    )
    sweep = commands.add_parser(
        "sweep",
        parents=[common],
        help="train one policy per alpha (x beta x lr) on Ray Tune, sharing one reference pass; rerun to resume",
    )
    sweep.add_argument("--config", help="YAML file of config sections; the sweep: section holds the grid")
    sweep.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. sweep.alphas=[0.8,1.0,1.2]"
    )
    evaluate = commands.add_parser(
        "eval",
        parents=[common],
        help="sample from a model on GSM8K, HumanEval, IFEval, MMLU-Pro; pass@k per temperature, with entropy",
    )
    evaluate.add_argument(
        "--model", help="model directory, hub id or embedded id (default: model.name_or_path of the config)"
    )
    evaluate.add_argument("--config", help="YAML file of config sections; the eval: section holds the plan")
    evaluate.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. eval.tasks=[gsm8k] eval.limit=20"
    )
    toy = commands.add_parser(
        "toy", help="the paper's toy: fit one Gaussian to a two-mode mixture under the alpha-weighted reverse KL"
    )
    toy.add_argument("--output-dir", default="outputs/toy", help="where toy.png, toy.md and toy.json go")
    toy.add_argument(
        "--d",
        type=float,
        default=None,
        help="the modes sit at -d and +d (default: where alpha=1 covers both and alpha<=0.9 picks one)",
    )
    toy.add_argument("--alphas", default=None, help="comma-separated alphas, e.g. 0.8,0.9,1.0")
    return parser


def _toy(args: argparse.Namespace) -> int:
    from hdpo_ray.toy import DEFAULT_ALPHAS, DEFAULT_D, run_toy

    try:
        alphas = [float(a) for a in args.alphas.split(",")] if args.alphas else list(DEFAULT_ALPHAS)
    except ValueError:
        raise ConfigError(f"--alphas {args.alphas!r} is not a comma-separated list of numbers") from None
    if any(a <= 0 for a in alphas) or (args.d is not None and args.d <= 0):
        raise ConfigError("--alphas and --d must be positive")
    run_toy(args.output_dir, alphas, DEFAULT_D if args.d is None else args.d)
    return 0


def _evaluate(config, model: str) -> int:
    from hdpo_ray.eval.runner import eval_output_dir, run_eval, tasks_to_run

    output_dir = eval_output_dir(config, model)
    results = run_eval(config, model, tasks=tasks_to_run(config), output_dir=output_dir)
    first_t, k = f"{config.eval.temperatures[0]:g}", config.eval.k[0]
    scores = ", ".join(f"{task} pass@{k} {by_t[first_t][f'pass@{k}']:.3f}" for task, by_t in results["tasks"].items())
    print(
        f"[hdpo-ray] eval done in {results['wall_s']:.0f} s ({results['backend']}): {scores} at T={first_t}; "
        f"tables in {output_dir}/results.md"
    )
    return 0


def _report_sweep(config, outcome: dict) -> int:
    best, rows = outcome["best"], outcome["rows"]
    finished = sum(r["status"] == "finished" for r in rows)
    if any(r["status"] == "interrupted" for r in rows):
        print(
            f"[hdpo-ray] sweep interrupted after {outcome['wall_s']:.0f} s with {finished}/{len(rows)} trials "
            "finished; rerun the same command to resume it"
        )
        return 1
    print(
        f"[hdpo-ray] sweep done in {outcome['wall_s']:.0f} s: {finished}/{len(rows)} trials finished, "
        f"{outcome['reference_forward_pairs']} reference forward passes (pairs) in all; table in "
        f"{config.output_dir}/results.md"
    )
    if best:
        print(
            f"[hdpo-ray] best by {config.sweep.metric}: {best['trial']} ({best[config.sweep.metric]:.4f}); model "
            f"in {best['final_model']}"
        )
    return 1 if any(r["status"].startswith("error") for r in rows) or best is None else 0


def _resume_config(args: argparse.Namespace):
    """RUN_DIR's own config.json with the run directory as output_dir; overrides apply on
    top (e.g. train.max_failures)."""
    from pathlib import Path

    from hdpo_ray.train.trainer import read_run_state, write_run_state

    run_dir = Path(args.resume).expanduser().absolute()
    if args.config:
        raise ConfigError("--resume takes the run's own config.json; drop --config (key=value overrides are allowed)")
    state = read_run_state(str(run_dir)) if run_dir.is_dir() else None
    if state is None or not (run_dir / "config.json").is_file():
        raise ConfigError(
            f"--resume {args.resume}: no run there (a run directory holds run.json and config.json; it is the "
            "run's output_dir)"
        )
    if state.get("status") not in ("running", "stopped"):
        raise ConfigError(
            f"--resume {args.resume}: run {state['name']} is {state.get('status')}, nothing to continue (run "
            "without --resume to start a new one)"
        )
    config = load_config(str(run_dir / "config.json"), [*args.overrides, f"output_dir={run_dir}"])
    if state["status"] == "stopped":  # stopped on purpose (non-finite losses): continue it, with the overrides given
        write_run_state(str(run_dir), state | {"status": "running"})
    return config


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "help_config", False):
        from hdpo_ray.config_reference import help_text

        print(help_text())
        return 0
    try:
        return _run(args)
    except Exception as err:  # noqa: BLE001 -- input errors become one line; anything else keeps its traceback
        known = user_facing(err)  # also when Ray wrapped it on the way up
        if known is None:
            raise
        print(f"hdpo-ray: error: {known}", file=sys.stderr)
        return known.exit_code


def _run(args: argparse.Namespace) -> int:
    if args.command == "toy":
        return _toy(args)
    if args.verbose:
        from hdpo_ray.runtime import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"
    logging.basicConfig(level=logging.INFO, format="[hdpo-ray] %(message)s")
    if getattr(args, "resume", None):
        config = _resume_config(args)
    else:
        config = load_config(args.config, args.overrides)
    if args.command == "eval":
        return _evaluate(config, args.model or config.model.name_or_path)
    from hdpo_ray.train.deepspeed_config import check_user_json

    check_user_json(config)
    if args.command == "sweep":
        from hdpo_ray.sweep.tuner import run_sweep

        return _report_sweep(config, run_sweep(config))
    from hdpo_ray.pipeline import run_training

    resume, overwrite = bool(getattr(args, "resume", None)), getattr(args, "overwrite", False)
    return _report_training(run_training(config, resume=resume, overwrite=overwrite))


def _report_training(result) -> int:
    m = result.metrics
    shown = [
        ("loss", 4),
        ("rewards/accuracies", 3),
        ("eval/rewards/accuracies", 3),
        ("eval/policy_accuracy", 3),
        ("eval/reference_accuracy", 3),
    ]
    # only what was computed: no "nan"
    figures = "".join(f", {key} {m[key]:.{digits}f}" for key, digits in shown if key in m)
    print(
        f"[hdpo-ray] done in {result.wall_seconds:.0f} s: {result.steps} steps{figures}; model in {result.final_model}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
