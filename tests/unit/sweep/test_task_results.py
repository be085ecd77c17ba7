"""A sweep's task columns and its alpha x temperature view, from hand-made trial rows."""

from __future__ import annotations

from hdpo_ray.config import load_config
from hdpo_ray.sweep.task_results import task_columns, write_alpha_temperature


def _row(alpha: float, pass1: float, entropy: float, status: str = "finished") -> dict:
    row = {"trial": f"alpha={alpha:g}_beta=0.1_lr=0.001", "alpha": alpha, "beta": 0.1, "lr": 1e-3, "status": status}
    for t, scale in (("0.5", 1.0), ("1", 0.5)):
        row |= {f"gsm8k/pass@1/t={t}": pass1 * scale, f"gsm8k/pass@2/t={t}": pass1, f"gsm8k/entropy/t={t}": entropy}
        row[f"gsm8k/finished/t={t}"] = 1.0  # a task summary metric, not a headline
    return row


def test_task_columns_in_first_seen_order_and_the_headline_ones():
    rows = [_row(0.8, 0.5, 1.0), _row(1.2, 0.25, 2.0)]
    assert task_columns(rows)[:4] == [
        "gsm8k/pass@1/t=0.5",
        "gsm8k/pass@2/t=0.5",
        "gsm8k/entropy/t=0.5",
        "gsm8k/finished/t=0.5",
    ]
    assert "gsm8k/finished/t=1" not in task_columns(rows, headline_only=True)
    assert task_columns([{"alpha": 1.0, "loss": 0.5}]) == []


def test_alpha_temperature_tables_hold_one_row_per_finished_trial(tmp_path):
    config = load_config(
        overrides=["eval.tasks=[gsm8k]", "eval.k=[1,2]", "eval.temperatures=[0.5,1.0]", "eval.num_samples=2"]
    )
    rows = [_row(0.8, 0.5, 1.0), _row(1.2, 0.25, 2.0), _row(1.0, 0.0, 0.0, status="error")]
    assert write_alpha_temperature(config, rows, tmp_path) == ["alpha_temperature.md", "alpha_temperature.png"]
    table = (tmp_path / "alpha_temperature.md").read_text()
    pass1 = table.split("## gsm8k: pass@1")[1].split("##")[0]
    assert "| trial | T=0.5 | T=1 |" in pass1
    assert "| alpha=0.8 | 0.500 | 0.250 |" in pass1 and "| alpha=1.2 | 0.250 | 0.125 |" in pass1
    assert "alpha=1 " not in table  # the failed trial has no row
    assert "| alpha=1.2 | 2.000 | 2.000 |" in table.split("## gsm8k: entropy")[1]
    assert (tmp_path / "alpha_temperature.png").stat().st_size > 10_000
    assert write_alpha_temperature(load_config(), rows, tmp_path / "none") == []  # no eval.tasks: nothing
