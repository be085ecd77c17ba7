"""The eval runner's pure steps on GSM8K problems and hand-made completions: ordering, scoring, tables, results."""

from __future__ import annotations

import pytest

from hdpo_ray.config import load_config
from hdpo_ray.eval.runner import (
    _results,
    _score_task,
    _task_table,
    eval_output_dir,
    selectable_task_metrics,
    tasks_to_run,
)
from hdpo_ray.eval.tasks import get_task
from hdpo_ray.eval.tasks.base import Problem


def _sample(problem_id: str, temperature: float, sample: int, completion: str) -> dict:
    return {"task": "gsm8k", "problem_id": problem_id, "temperature": temperature, "sample": sample,
            "completion": completion, "entropy": 0.5, "num_tokens": 4, "finished": True,
            "prompt_tokens": 9, "prompt_truncated": problem_id == "gsm8k/1"}  # fmt: skip


PROBLEMS = [Problem("gsm8k/0", "2 + 2?", "4"), Problem("gsm8k/1", "3 + 4?", "7")]


def test_samples_are_scored_in_problem_temperature_sample_order_and_tabled_per_temperature():
    e = load_config(overrides=["eval.temperatures=[1.0]", "eval.k=[1,2]", "eval.num_samples=2"]).eval
    task = get_task("gsm8k")
    shuffled = [
        _sample("gsm8k/1", 1.0, 1, "The answer is 8."),
        _sample("gsm8k/0", 1.0, 1, "#### 5"),
        _sample("gsm8k/0", 1.0, 0, "So 2 + 2 = 4. #### 4"),
        _sample("gsm8k/1", 1.0, 0, "#### 9"),
    ]
    records = _score_task(e, task, PROBLEMS, shuffled)
    assert [(r["problem_id"], r["sample"], r["correct"]) for r in records] == [
        ("gsm8k/0", 0, True), ("gsm8k/0", 1, False), ("gsm8k/1", 0, False), ("gsm8k/1", 1, False)
    ]  # fmt: skip
    table, truncated = _task_table(e, task, records)
    # gsm8k/0: 1 of 2 correct, gsm8k/1: 0 of 2 -> pass@1 = (1/2 + 0) / 2, pass@2 = (1 + 0) / 2
    assert table["1"]["pass@1"] == pytest.approx(0.25) and table["1"]["pass@2"] == pytest.approx(0.5)
    assert truncated == 1  # one problem's prompt, counted once
    results = _results(e, "my-model", "fp", "hf", {"gsm8k": task}, {"gsm8k": table}, {"gsm8k": truncated})
    assert results["metrics"]["gsm8k/pass@1/t=1"] == pytest.approx(0.25) and results["backend"] == "hf"
    assert results["data"] == {"gsm8k": task.default_source} and results["k"] == [1, 2]


def test_greedy_has_one_completion_per_problem_and_pass_at_k_is_pass_at_1():
    e = load_config(overrides=["eval.temperatures=[0,1.0]", "eval.k=[1,2]", "eval.num_samples=2"]).eval
    task = get_task("gsm8k")
    greedy = [_sample("gsm8k/0", 0, 0, "#### 4"), _sample("gsm8k/1", 0, 0, "#### 9")]
    sampled = [_sample(p, 1.0, i, "#### 4") for p in ("gsm8k/0", "gsm8k/1") for i in (0, 1)]
    table, _ = _task_table(e, task, _score_task(e, task, PROBLEMS, greedy + sampled))
    # greedy: 1 of 2 problems right, n = 1 each; k copies of one completion pass or fail together
    assert table["0"]["samples"] == 2 and table["0"]["pass@1"] == table["0"]["pass@2"] == 0.5
    assert table["1"]["samples"] == 4 and table["1"]["pass@1"] == 0.5 and table["1"]["pass@2"] == 0.5
    results = _results(e, "m", "fp", "hf", {"gsm8k": task}, {"gsm8k": table}, {"gsm8k": 0})
    assert results["samples_per_problem"] == {"0": 1, "1": 2}


def test_results_go_to_a_folder_per_model_and_never_over_another_models(tmp_path):
    import json

    from hdpo_ray.eval.runner import EvalOutputError

    config = load_config(overrides=["output_dir=/tmp/run", "eval.tasks=[]", "eval.temperatures=[0.5]", "eval.k=[1]"])
    assert eval_output_dir(config, "hdpo-ray/tiny-llama-sft") == "/tmp/run/eval/hdpo-ray__tiny-llama-sft"
    assert eval_output_dir(config, "./outputs/a/final") == "/tmp/run/eval/outputs__a__final"
    assert eval_output_dir(config, "/mnt/runs/b/final/") == "/tmp/run/eval/mnt__runs__b__final"
    assert eval_output_dir(config, ".cache/m") == "/tmp/run/eval/.cache__m"
    outside = eval_output_dir(config, "../x/final")  # not the same folder as x/final
    assert outside.endswith("__x__final") and outside != "/tmp/run/eval/x__final"
    derived = load_config(overrides=[f"output_dir={tmp_path}"])
    (tmp_path / "eval" / "a__m").mkdir(parents=True)
    (tmp_path / "eval" / "a__m" / "results.json").write_text(json.dumps({"model": "a__m"}))
    with pytest.raises(
        EvalOutputError, match=r"a__m \(the folder named after this model\) holds .*set eval.output_dir"
    ):
        eval_output_dir(derived, "a/m")
    chosen = load_config(overrides=[f"eval.output_dir={tmp_path}"])
    (tmp_path / "results.json").write_text(json.dumps({"model": "some/model"}))
    assert eval_output_dir(chosen, "some/model") == str(tmp_path)  # the same model: evaluated again
    with pytest.raises(EvalOutputError, match=r"holds the results of another model \(some/model\)"):
        eval_output_dir(chosen, "other/model")


def test_plan_defaults():
    config = load_config(overrides=["output_dir=/tmp/run", "eval.tasks=[]", "eval.temperatures=[0.5]", "eval.k=[1]"])
    assert tasks_to_run(config) == ["gsm8k", "humaneval", "ifeval", "mmlu_pro"]
    gsm8k = load_config(overrides=["eval.tasks=[gsm8k,gsm8k]", "eval.temperatures=[0.5]", "eval.k=[1]"])
    assert tasks_to_run(gsm8k) == ["gsm8k"]
    assert selectable_task_metrics(gsm8k.eval)[:2] == ["gsm8k/pass@1/t=0.5", "gsm8k/entropy/t=0.5"]
