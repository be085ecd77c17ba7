"""`hdpo-ray eval` through the real console script on the session's Ray cluster: all four tasks on the
embedded SFT model (real data, real sandbox), the result files, and bad input in one line."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli

TASKS = ("gsm8k", "humaneval", "ifeval", "mmlu_pro")
LIMIT, SAMPLES, TEMPERATURES = 3, 2, ("0", "0.3", "1")  # 0: greedy, one completion per problem


@pytest.mark.slow
def test_eval_runs_all_four_tasks_on_the_embedded_default(ray_address, tmp_path):
    out = tmp_path / "eval" / "hdpo-ray__tiny-llama-sft"  # a folder per model
    result = run_cli(
        [
            "eval",
            f"output_dir={tmp_path}",
            f"eval.limit={LIMIT}",
            f"eval.num_samples={SAMPLES}",
            "eval.k=[1,2]",
            f"eval.temperatures=[{','.join(TEMPERATURES)}]",
            "eval.max_new_tokens=24",
        ],
        ray_address,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "eval done" in result.stdout and "gsm8k pass@1" in result.stdout

    results = json.loads((out / "results.json").read_text())
    assert (
        results["backend"] == "hf"
        and results["model"] == "hdpo-ray/tiny-llama-sft"
        and list(results["tasks"]) == list(TASKS)
    )
    for task in TASKS:
        by_t = results["tasks"][task]
        assert list(by_t) == list(TEMPERATURES)
        assert all(
            row["problems"] == LIMIT and row["samples"] == LIMIT * SAMPLES and 0 <= row["pass@1"] <= row["pass@2"] <= 1
            for t, row in by_t.items()
            if t != "0"
        )
        greedy = by_t["0"]
        assert greedy["samples"] == LIMIT and greedy["pass@1"] == greedy["pass@2"], (task, greedy)
        # Colder sampling draws from sharper distributions, on every task.
        assert by_t["0.3"]["entropy"] < by_t["1"]["entropy"], (task, by_t)
    assert {"prompt_strict", "instruction_loose"} <= set(results["tasks"]["ifeval"]["1"]) and "accuracy" in results[
        "tasks"
    ]["mmlu_pro"]["1"]
    assert results["metrics"]["gsm8k/pass@1/t=0.3"] == results["tasks"]["gsm8k"]["0.3"]["pass@1"]

    assert results["samples_per_problem"] == {"0": 1, "0.3": SAMPLES, "1": SAMPLES}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == len(TASKS) * LIMIT * (1 + (len(TEMPERATURES) - 1) * SAMPLES)
    assert all(
        {"problem_id", "completion", "correct", "num_tokens", "entropy"} <= set(s) and s["num_tokens"] <= 24
        for s in samples
    )
    assert {s["details"]["status"] for s in samples if s["task"] == "humaneval"} <= {
        "passed",
        "failed",
        "timeout",
        "killed",
        "error",
    }
    assert "## humaneval (3 problems)" in (out / "results.md").read_text()
    assert all((out / name).stat().st_size > 10_000 for name in ("passk.png", "temperature.png"))
    _greedy_is_generate_without_sampling(samples)

    # A second model into the same OUTPUT_DIR: its own folder; the first model's results stay as they were.
    first = (out / "results.json").read_text()
    other = run_cli(
        ["eval", "--model", "hdpo-ray/tiny-llama", f"output_dir={tmp_path}", "eval.tasks=[gsm8k]", "eval.limit=1",
         "eval.temperatures=[0]", "eval.max_new_tokens=8"],
        ray_address,
    )  # fmt: skip
    assert other.returncode == 0, other.stderr[-3000:]
    second = json.loads((tmp_path / "eval" / "hdpo-ray__tiny-llama" / "results.json").read_text())
    assert second["model"] == "hdpo-ray/tiny-llama" and (out / "results.json").read_text() == first


def _greedy_is_generate_without_sampling(samples: list[dict]) -> None:
    """The T=0 completions of two GSM8K problems, redrawn in-process with `generate(do_sample=False)`."""
    import torch

    from hdpo_ray.config import EMBEDDED_SFT_MODEL
    from hdpo_ray.data.template import encode_prompt, fit_prompt
    from hdpo_ray.eval.tasks import get_task
    from hdpo_ray.models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(EMBEDDED_SFT_MODEL).eval(), load_tokenizer(EMBEDDED_SFT_MODEL)
    greedy = {s["problem_id"]: s["completion"] for s in samples if s["task"] == "gsm8k" and s["temperature"] == 0}
    for problem in get_task("gsm8k").load(None, 2):
        _, ids = encode_prompt(tokenizer, [{"role": "user", "content": problem.prompt}])
        prompt = torch.tensor([fit_prompt(ids, 768, tokenizer.bos_token_id)[0]])  # eval.max_prompt_length
        drawn = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=24,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )[0, prompt.shape[1]:]  # fmt: skip
        assert greedy[problem.id] == tokenizer.decode(drawn, skip_special_tokens=True), problem.id


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "/nonexistent/model"], "model /nonexistent/model is neither a local directory"),
        (["eval.backend=vllm"], "vllm is not installed"),
        (["eval.k=[5]"], "eval.k must be"),
    ],
)
def test_bad_eval_input_exits_2_with_one_line(args, expected, tmp_path):
    result = run_cli(["eval", f"eval.output_dir={tmp_path}", *args], None, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        result.stderr.startswith("hdpo-ray: error: ") and expected in result.stderr and result.stderr.count("\n") == 1
    )


def test_task_data_without_the_official_fields_exits_2_naming_the_line(tmp_path):
    bad = tmp_path / "gsm8k.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?"}\n')
    result = run_cli(
        ["eval", f"eval.output_dir={tmp_path}", "eval.tasks=[gsm8k]", f"eval.data.gsm8k={bad}"], None, timeout=120
    )
    assert (
        result.returncode == 2 and result.stderr.startswith("hdpo-ray: error: ") and f"{bad}, line 2" in result.stderr
    ), result.stderr[-2000:]
