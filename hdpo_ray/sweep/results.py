"""A sweep's results: one row per trial -> results.csv, results.md, alpha_sweep.png and best.json.

The best trial is chosen on sweep.metric, which must compare across alphas. The H-DPO loss and the
implied rewards do not: both are built from alpha * log pi, so a smaller alpha gives a different loss
for the same policy. The default, eval/policy_accuracy, is how often the trained policy itself gives
the held-out chosen response a higher mean log-prob per token than the rejected one; it depends on
the policy alone. With eval.tasks, each trial's model is also evaluated on the tasks and sweep.metric
may be a task metric such as `gsm8k/pass@1/t=0.6` (hdpo_ray.sweep.task_results adds the columns and
the alpha x temperature table).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from hdpo_ray.config import Config
from hdpo_ray.sweep.grid import trial_name

SELECTABLE_METRICS = (
    "eval/policy_accuracy",
    "eval/logps/chosen",
    "eval/entropy",
    "entropy/teacher_forced",
    "entropy/sampled",
)
COLUMNS = (
    "trial",
    "alpha",
    "beta",
    "lr",
    "status",
    "steps",
    "loss",
    "rewards/accuracies",
    "policy_accuracy",
    "eval/loss",
    "eval/rewards/accuracies",
    "eval/policy_accuracy",
    "eval/logps/chosen",
    "eval/entropy",
    "entropy/teacher_forced",
    "entropy/sampled",
    "entropy/sampled_tokens",
    "tokens_per_s",
    "wall_s",
    "final_model",
)
TRAIN_KEYS = (
    "loss",
    "rewards/accuracies",
    "policy_accuracy",
    "eval/loss",
    "eval/rewards/accuracies",
    "eval/policy_accuracy",
    "eval/logps/chosen",
    "eval/entropy",
)


def trial_row(
    params: dict[str, float],
    metrics: dict[str, Any],
    measures: dict[str, float],
    *,
    steps: int | None,
    wall_s: float | None,
    final_model: str | None,
    status: str,
) -> dict[str, Any]:
    """One table row from a trial's grid point, its last logged metrics and its measures (entropy, task metrics)."""
    row = {
        "trial": trial_name(params),
        **params,
        "status": status,
        "steps": steps if steps is not None else metrics.get("step"),
    }
    row |= {k: metrics[k] for k in TRAIN_KEYS if k in metrics}
    row |= measures
    row |= {"wall_s": round(wall_s, 1) if wall_s is not None else None, "final_model": final_model}
    return row


def select_best(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The finished trial with the best finite `metric` (ties: the first in grid order), or None."""
    scored = [
        r
        for r in rows
        if r.get("status") == "finished" and isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])
    ]
    if not scored:
        return None
    sign = 1 if mode == "max" else -1
    return max(scored, key=lambda r: (sign * r[metric], -rows.index(r)))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def write_results(
    config: Config, output_dir: Path, rows: list[dict[str, Any]], reference: dict[str, int]
) -> dict[str, Any] | None:
    """results.csv, results.md, alpha_sweep.png and best.json in output_dir; returns the best row."""
    sweep = config.sweep
    from hdpo_ray.sweep.task_results import task_columns, write_alpha_temperature

    best = select_best(rows, sweep.metric, sweep.mode)
    with open(output_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, *task_columns(rows)], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    shown = [c for c in COLUMNS if c != "final_model"] + task_columns(rows, headline_only=True)
    lines = [
        "# H-DPO alpha sweep",
        "",
        f"- Reference log-probs: {reference['pairs']} pairs (train + eval); reference forward passes over the whole "
        f"sweep: {reference['forward_pairs']} pairs in {reference['invocations']} invocation(s), "
        f"{reference['this_run']} in the latest; every trial read the cache"
        + "".join(
            f" (reference-{e['entry']}: {e['pairs']} pairs scored in {e['seconds']:.0f} s)"
            for e in reference.get("entries", [])
        )
        + ".",
        f"- Selection: `{sweep.metric}` ({sweep.mode}); best trial: **{best['trial'] if best else 'none finished'}**"
        + (f" ({sweep.metric} = {_cell(best[sweep.metric])}, model: `{best['final_model']}`)" if best else ""),
        f"- Entropy: mean nats per token on the first {sweep.entropy_prompts} valid eval pairs (or all, if fewer), "
        "teacher-forced on the chosen completions and sampled at temperature 1.0 "
        f"(seed {sweep.entropy_seed}, up to {sweep.entropy_max_new_tokens} new tokens)"
        + (
            "; the reference model on the same prompts: teacher-forced "
            f"{_cell(reference['entropy']['entropy/teacher_forced'])}, "
            f"sampled {_cell(reference['entropy']['entropy/sampled'])}."
            if reference.get("entropy")
            else "."
        ),
        "",
        "| " + " | ".join(shown) + " |",
        "|" + "---|" * len(shown),
    ]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in shown) + " |" for row in rows]
    lines += ["", "Final models: " + ", ".join(f"`{r['final_model']}`" for r in rows if r.get("final_model")), ""]
    (output_dir / "results.md").write_text("\n".join(lines))
    (output_dir / "best.json").write_text(
        json.dumps({"metric": sweep.metric, "mode": sweep.mode, "best": best}, indent=2)
    )
    plot_sweep(rows, output_dir / "alpha_sweep.png", sweep.metric)
    write_alpha_temperature(config, rows, output_dir)
    return best


def plot_sweep(rows: list[dict[str, Any]], path: Path, metric: str) -> None:
    """Entropy (both measures) and the eval metrics against alpha, one line per (beta, lr)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("entropy/teacher_forced", "teacher-forced entropy (nats/token)"),
        ("entropy/sampled", "sampled entropy, T=1 (nats/token)"),
        (metric, metric),
        ("eval/loss", "eval H-DPO loss (not comparable across alpha)"),
    ]
    panels = list(dict(panels).items())  # metric may repeat an entropy panel
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row["beta"], row["lr"]), []).append(row)
    for ax, (key, title) in zip(axes, panels, strict=True):
        for (beta, lr), group in groups.items():
            points = sorted(
                (r["alpha"], r[key]) for r in group if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=f"beta={beta:g}, lr={lr:g}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("alpha")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
