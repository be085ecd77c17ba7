"""Aggregation and result files of `hdpo-ray eval`, with numbers derived by hand."""

from __future__ import annotations

import json

import pytest

from hdpo_ray.eval.report import aggregate, flat_metrics, metric_key, results_markdown, write_results


def _record(problem: str, correct: bool, entropy: float = 1.0, tokens: int = 10, finished: bool = True) -> dict:
    return {"problem_id": problem, "correct": correct, "entropy": entropy, "num_tokens": tokens, "finished": finished}


def test_aggregate_by_hand():
    # problem a: 1 of 2 correct -> pass@1 1/2, pass@2 1; problem b: 0 of 2 -> 0, 0. Means: pass@1 1/4, pass@2 1/2.
    records = [
        _record("a", True, 2.0, 4),
        _record("a", False, 4.0, 8, False),
        _record("b", False, 1.0, 6),
        _record("b", False, 3.0, 2),
    ]
    row = aggregate(records, [1, 2], summarize=lambda recs: {"extra": len(recs)})
    assert row["pass@1"] == pytest.approx(0.25) and row["pass@2"] == pytest.approx(0.5)
    assert (row["problems"], row["samples"], row["correct"]) == (2, 4, 1)
    assert (
        row["entropy"] == pytest.approx(2.5)
        and row["tokens"] == pytest.approx(5.0)
        and row["finished"] == pytest.approx(0.75)
    )
    assert row["extra"] == 4


def test_pass_at_1_is_the_mean_of_correct_samples():
    records = [
        _record(p, c) for p, c in [("a", True), ("a", True), ("a", False), ("b", True), ("b", False), ("b", False)]
    ]
    assert aggregate(records, [1])["pass@1"] == pytest.approx(3 / 6)


def test_flat_metrics_names_and_skips_counts():
    tables = {"gsm8k": {"0.6": {"pass@1": 0.5, "problems": 2, "samples": 4, "correct": 1, "entropy": 1.5}}}
    assert flat_metrics(tables) == {"gsm8k/pass@1/t=0.6": 0.5, "gsm8k/entropy/t=0.6": 1.5}
    assert metric_key("ifeval", "prompt_strict", 1.0) == "ifeval/prompt_strict/t=1"


def _results(tmp_path) -> dict:
    row = {
        "pass@1": 0.25,
        "pass@2": 0.5,
        "problems": 2,
        "samples": 4,
        "correct": 1,
        "entropy": 2.5,
        "tokens": 5.0,
        "finished": 0.75,
    }
    return {
        "model": "m",
        "backend": "hf",
        "num_samples": 2,
        "k": [1, 2],
        "temperatures": [0.5, 1.0],
        "top_p": 1.0,
        "max_new_tokens": 8,
        "seed": 0,
        "limit": 2,
        "wall_s": 3.0,
        "sampling_s": 2.0,
        "scoring_s": 1.0,
        "tasks": {"gsm8k": {"0.5": dict(row), "1": dict(row, entropy=4.0)}},
    }


def test_markdown_has_a_row_per_temperature():
    text = results_markdown(_results(None))
    assert "## gsm8k (2 problems)" in text
    assert "| 0.5 | 0.250 | 0.500 | 2.500 | 5.000 | 0.750 | 1/4 |" in text and "| 1 | 0.250 | 0.500 | 4.000 |" in text


def test_write_results_writes_every_file(tmp_path):
    results = _results(tmp_path)
    write_results(results, [{"task": "gsm8k", "problem_id": "gsm8k/0"}], str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text())["plots"] == ["passk.png", "temperature.png"]
    assert (tmp_path / "samples.jsonl").read_text().count("\n") == 1
    assert all((tmp_path / name).stat().st_size > 5_000 for name in ("passk.png", "temperature.png"))
    assert not list(tmp_path.glob("*.partial"))
