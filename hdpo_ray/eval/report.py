"""From scored samples to numbers: pass@k, entropy and task metrics per task x temperature, and the
files a user reads: results.json, results.md, passk.png, temperature.png.

Metric names are flat so a sweep can select on them: `{task}/{metric}/t={temperature}`, e.g.
`gsm8k/pass@1/t=0.6`, `ifeval/prompt_strict/t=1`, `humaneval/entropy/t=0.2`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from hdpo_ray.eval.passk import mean_pass_at_k
from hdpo_ray.storage import atomic_write, atomic_write_lines

RESULTS_FILE = "results.json"


def metric_key(task: str, metric: str, temperature: float) -> str:
    return f"{task}/{metric}/t={temperature:g}"


def aggregate(records: list[dict[str, Any]], ks: list[int], summarize=None, greedy: bool = False) -> dict[str, Any]:
    """Scored samples of one task at one temperature -> pass@k for each k, sample counts, mean entropy/tokens.

    records: dicts with problem_id, correct, entropy (mean nats/token of the completion), num_tokens,
    finished; every problem has the same number of samples n. `summarize(records)` adds task metrics.
    greedy: one completion per problem, and k of them would be k copies: pass@k is pass@1 for every k.
    """
    per_problem: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        per_problem[r["problem_id"]].append(bool(r["correct"]))
    counts = [(len(v), sum(v)) for v in per_problem.values()]
    n = len(records) or 1
    out: dict[str, Any] = {f"pass@{k}": mean_pass_at_k(counts, 1 if greedy else k) for k in ks}
    out.update(
        problems=len(per_problem),
        samples=len(records),
        correct=sum(c for _, c in counts),
        entropy=sum(r["entropy"] for r in records) / n,
        tokens=sum(r["num_tokens"] for r in records) / n,
        finished=sum(bool(r["finished"]) for r in records) / n,
    )
    if summarize is not None:
        out.update(summarize(records))
    return out


def flat_metrics(tables: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float]:
    """{task: {temperature: {metric: value}}} -> {"task/metric/t=T": value} for numeric metrics."""
    return {
        metric_key(task, name, float(t)): float(value)
        for task, by_t in tables.items()
        for t, row in by_t.items()
        for name, value in row.items()
        if isinstance(value, (int, float)) and name not in ("problems", "samples", "correct")
    }


def _fmt(value: Any) -> str:
    """3 decimals; a small nonzero value (a near-greedy entropy) keeps 2 significant digits instead of showing 0.000."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:.2g}" if 0 < abs(value) < 0.0005 else f"{value:.3f}"


def results_markdown(results: dict[str, Any]) -> str:
    """One table per task: a row per temperature; pass@k columns first, then entropy and task metrics."""
    lines = [
        f"# Evaluation of {results['model']}",
        "",
        f"backend {results['backend']}, {results['num_samples']} samples per problem"
        + (" (1 at temperature 0: greedy, pass@k = pass@1)" if 0 in results["temperatures"] else "")
        + f", top_p {results['top_p']}, "
        f"max_new_tokens {results['max_new_tokens']}, seed {results['seed']}, limit {results['limit']}; "
        f"{results['wall_s']:.0f} s (sampling {results['sampling_s']:.0f} s, scoring {results['scoring_s']:.0f} s)",
        "",
        (
            "entropy: mean over completions of the mean per-token entropy (nats) of the sampling distribution (at "
            "temperature 0, greedy: the model's own distribution along the greedy completion); tokens: mean "
            "completion length."
        ),
    ]
    for task, by_t in results["tasks"].items():
        first = next(iter(by_t.values()))
        passk = [c for c in first if c.startswith("pass@")]
        extra = [c for c in first if c not in passk and c not in ("problems", "samples", "correct")]
        columns = ["temperature", *passk, *extra, "correct/samples"]
        lines += [
            "",
            f"## {task} ({first['problems']} problems)",
            "",
            "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns),
        ]
        for t, row in by_t.items():
            cells = [t, *(_fmt(row[c]) for c in passk + extra), f"{row['correct']}/{row['samples']}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_results(results: dict[str, Any], output_dir: Path) -> list[str]:
    """passk.png (pass@k against k, a line per temperature) and temperature.png (pass@1
    and entropy against temperature)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    ks = sorted(results["k"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for t, row in results["tasks"][task].items():
            ax.plot(ks, [row[f"pass@{k}"] for k in ks], marker="o", label=f"T={t}")
        ax.set(title=task, xlabel="k", ylabel="pass@k", xticks=ks)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output_dir / "passk.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, len(tasks), figsize=(4 * len(tasks), 6), squeeze=False)
    for col, task in enumerate(tasks):
        by_t = results["tasks"][task]
        temps = [float(t) for t in by_t]
        for k in ks if len(ks) <= 3 else [ks[0], ks[-1]]:
            axes[0][col].plot(temps, [row[f"pass@{k}"] for row in by_t.values()], marker="o", label=f"pass@{k}")
        axes[0][col].set(title=task, ylabel="accuracy")
        axes[0][col].legend(fontsize=8)
        axes[1][col].plot(temps, [row["entropy"] for row in by_t.values()], marker="o", color="tab:red")
        axes[1][col].set(xlabel="temperature", ylabel="entropy (nats/token)")
    fig.tight_layout()
    fig.savefig(output_dir / "temperature.png", dpi=110)
    plt.close(fig)
    return ["passk.png", "temperature.png"]


def write_results(results: dict[str, Any], samples: list[dict[str, Any]], output_dir: str) -> None:
    """results.json, results.md, samples.jsonl and the plots; each file is written whole, then renamed."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # line by line: a full-size run holds hundreds of thousands of samples
    atomic_write_lines(out / "samples.jsonl", (json.dumps(sample, ensure_ascii=False) for sample in samples))
    results["plots"] = plot_results(results, out)
    atomic_write(out / "results.md", results_markdown(results))
    atomic_write(out / RESULTS_FILE, json.dumps(results, indent=1))
