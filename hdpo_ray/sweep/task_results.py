"""A sweep's task evaluation across its models: task columns for results.md and the alpha x temperature view.

The paper's open question is which sampling temperature suits which alpha. With eval.tasks set, each
trial's model is sampled at every eval.temperatures; alpha_temperature.md holds, per task, pass@1,
pass@k (largest k) and the mean token entropy with a row per trial and a column per temperature, and
alpha_temperature.png draws the same as lines over temperature, one per trial.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from hdpo_ray.config import EVAL_TASKS, Config

TASK_KEY = re.compile(rf"^(?P<task>{'|'.join(EVAL_TASKS)})/(?P<metric>.+)/t=(?P<t>[^/]+)$")


def task_columns(rows: list[dict[str, Any]], *, headline_only: bool = False) -> list[str]:
    """Task metric keys found in rows, first seen first; headline_only keeps pass@k and entropy (results.md's width)."""
    keys = dict.fromkeys(k for row in rows for k in row if TASK_KEY.match(k))
    if headline_only:
        keys = {
            k: None
            for k in keys
            if TASK_KEY.match(k)["metric"].startswith("pass@") or TASK_KEY.match(k)["metric"] == "entropy"
        }
    return list(keys)


def _value(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _label(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """alpha alone when it names the trial; the full trial name when betas or lrs vary too."""
    return f"alpha={row['alpha']:g}" if len({(r["beta"], r["lr"]) for r in rows}) == 1 else row["trial"]


def write_alpha_temperature(config: Config, rows: list[dict[str, Any]], output_dir: Path) -> list[str]:
    """alpha_temperature.md and .png over the finished trials; returns the names written ([] without eval.tasks)."""
    e = config.eval
    done = [r for r in rows if r.get("status") == "finished"]
    if not e.tasks or not done:
        return []
    metrics = list(dict.fromkeys([f"pass@{min(e.k)}", f"pass@{max(e.k)}", "entropy"]))
    lines = [
        "# alpha x temperature",
        "",
        f"{e.num_samples} samples per problem, first {e.limit or 'all'} problems per task; entropy in nats per token.",
        "",
    ]
    for task in dict.fromkeys(e.tasks):
        for metric in metrics:
            lines += [
                f"## {task}: {metric}",
                "",
                "| trial | " + " | ".join(f"T={t:g}" for t in e.temperatures) + " |",
                "|---|" + "---|" * len(e.temperatures),
            ]
            for row in done:
                cells = [_value(row, f"{task}/{metric}/t={t:g}") for t in e.temperatures]
                lines.append(
                    f"| {_label(row, done)} | " + " | ".join("" if c is None else f"{c:.3f}" for c in cells) + " |"
                )
            lines.append("")
    (output_dir / "alpha_temperature.md").write_text("\n".join(lines))
    _plot(config, done, metrics, output_dir / "alpha_temperature.png")
    return ["alpha_temperature.md", "alpha_temperature.png"]


def _plot(config: Config, rows: list[dict[str, Any]], metrics: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, temps = list(dict.fromkeys(config.eval.tasks)), config.eval.temperatures
    fig, axes = plt.subplots(len(tasks), len(metrics), figsize=(4 * len(metrics), 3.2 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            for row in rows:
                points = [(t, v) for t in temps if (v := _value(row, f"{task}/{metric}/t={t:g}")) is not None]
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=_label(row, rows))
            ax.set(title=f"{task}: {metric}", xlabel="temperature")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
