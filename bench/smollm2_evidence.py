"""Does H-DPO move a real model? The three tables of the SmolLM2 section of docs/results.md, from finished runs.

    hdpo-ray train --config jobs/smollm2-135m.yaml                                  # alpha = 1, ~30 min
    hdpo-ray sweep --config jobs/smollm2-135m.yaml train.max_steps=15 output_dir=outputs/smollm2-sweep
    hdpo-ray eval --config jobs/smollm2-135m.yaml --model MODEL eval.output_dir=DIR ...  # per model
    python bench/smollm2_evidence.py --run outputs/smollm2-135m --sweep outputs/smollm2-sweep \\
        --eval reference=DIR --eval alpha-1.0=DIR --eval alpha-0.8=DIR

Prints markdown: (1) held-out accuracies of the trained policy beside the reference's own, (2) entropy per
alpha beside the reference's, (3) IFEval and GSM8K per model. Reads only the runs' own output files.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def learning_table(run: Path) -> list[str]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/loss" in r]
    lines = [
        (
            "| step | eval/loss | eval/rewards/accuracies | eval/policy_accuracy | eval/reference_accuracy (pi_ref, "
            "same pairs) |"
        ),
        "|---|---|---|---|---|",
    ]
    lines += [
        (
            f"| {r['step']} | {r['eval/loss']:.4f} | {r['eval/rewards/accuracies']:.3f} | "
            f"{r['eval/policy_accuracy']:.3f} | {r['eval/reference_accuracy']:.3f} |"
        )
        for r in evals
    ]
    train = [r for r in rows if "loss" in r]
    lines += [
        "",
        f"Training: first logged window (step {train[0]['step']}) loss {train[0]['loss']:.4f}, last window (step "
        f"{train[-1]['step']}) loss {train[-1]['loss']:.4f}, rewards/accuracies {train[-1]['rewards/accuracies']:.3f}; "
        f"mean training tokens/s {sum(r['tokens_per_s'] for r in train[1:]) / max(len(train) - 1, 1):.0f}.",
    ]
    return lines


def entropy_table(sweep: Path) -> list[str]:
    reference = json.loads((sweep / "reference_entropy.json").read_text())
    with open(sweep / "results.csv") as f:
        trials = list(csv.DictReader(f))
    lines = [
        (
            "| model | teacher-forced entropy | sampled entropy (T=1) | sampled finished | eval/policy_accuracy | "
            "eval/loss |"
        ),
        "|---|---|---|---|---|---|",
    ]
    lines.append(
        f"| reference | {reference['entropy/teacher_forced']:.4f} | {reference['entropy/sampled']:.4f} | "
        f"{reference['entropy/sampled_finished']:.2f} | | |"
    )
    for t in trials:
        lines.append(
            f"| alpha={float(t['alpha']):g} | {float(t['entropy/teacher_forced']):.4f} | "
            f"{float(t['entropy/sampled']):.4f} | | {float(t['eval/policy_accuracy']):.3f} | "
            f"{float(t['eval/loss']):.4f} |"
        )
    return lines


def behaviour_table(evals: list[tuple[str, Path]]) -> list[str]:
    """Per model, task and temperature, recomputed from samples.jsonl on the problems every model was evaluated
    on (the first N of each task, N the smallest eval.limit among the runs), so the rows compare."""
    from hdpo_ray.eval.report import aggregate
    from hdpo_ray.eval.tasks import get_task

    runs = [
        (
            name,
            [json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines()],
            json.loads((d / "results.json").read_text()),
        )
        for name, d in evals
    ]
    common: dict[str, set[str]] = {}
    for _, samples, _ in runs:
        for task in {s["task"] for s in samples}:
            ids = {s["problem_id"] for s in samples if s["task"] == task}
            common[task] = common.get(task, ids) & ids
    lines = [
        (
            "| model | task (problems) | T | pass@1 | pass@4 | prompt_strict | instruction_strict | prompt_loose | "
            "finished | entropy | mean tokens |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, samples, results in runs:
        for task in sorted({s["task"] for s in samples}):
            for t in sorted({s["temperature"] for s in samples if s["task"] == task}):
                mine = [
                    s
                    for s in samples
                    if s["task"] == task and s["temperature"] == t and s["problem_id"] in common[task]
                ]
                row = aggregate(mine, [k for k in results["k"] if k in (1, 4)], get_task(task).summarize)
                cells = [
                    name,
                    f"{task} ({row['problems']})",
                    f"{t:g}",
                    *(
                        f"{row[k]:.3f}" if k in row else ""
                        for k in (
                            "pass@1",
                            "pass@4",
                            "prompt_strict",
                            "instruction_strict",
                            "prompt_loose",
                            "finished",
                            "entropy",
                        )
                    ),
                    f"{row['tokens']:.0f}",
                ]
                lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="OUTPUT_DIR of the alpha = 1 training run")
    parser.add_argument("--sweep", type=Path, help="OUTPUT_DIR of the alpha sweep")
    parser.add_argument("--eval", action="append", default=[], metavar="NAME=DIR", help="an eval output folder, named")
    args = parser.parse_args()
    if args.run:
        print("\n".join(["## Learning (held-out pairs)", "", *learning_table(args.run), ""]))
    if args.sweep:
        print("\n".join(["## Entropy per alpha", "", *entropy_table(args.sweep), ""]))
    if args.eval:
        named = [(spec.split("=", 1)[0], Path(spec.split("=", 1)[1])) for spec in args.eval]
        print("\n".join(["## Behaviour", "", *behaviour_table(named), ""]))


if __name__ == "__main__":
    main()
